from .table import main

main()
