"""Quality study of CSQ attention against other similarity kernels (see README.md)."""
