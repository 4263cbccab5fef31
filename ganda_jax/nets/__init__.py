"""Networks shared by the methods, and the CPU-only convolution rewrites."""
