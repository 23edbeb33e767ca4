"""The tiny decoder-only transformer and its attention and matmul kernels."""
