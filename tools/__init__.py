"""Developer tools, outside the library: the original's training mechanics (to measure and test
against) and the count of kernel-launching ops."""
