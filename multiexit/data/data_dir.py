"""``data_dir`` itself: a folder, or a path where one can be made (a data set downloads or
generates into it). Anything else is one line that says so, before a data set tries to read,
download or write there and fails with a message about that instead."""
from pathlib import Path

from ..errors import DataError


def check_data_dir(data_dir):
    """Raise a DataError where ``data_dir`` is not a folder and none can be made there: it, or
    the first of its parents that exists, is not a folder (a regular file, say)."""
    path = Path(data_dir)
    for existing in (path, *path.parents):
        if existing.exists():
            break
    else:
        return
    if existing.is_dir():
        return
    where = '' if existing == path else f' ({existing} is not a folder)'
    raise DataError(f'data_dir={data_dir} is not a folder{where}: set data_dir to the folder '
                    f'that holds the data set (or where it is to be downloaded or generated)')
