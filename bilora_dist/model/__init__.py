"""The frozen base: loading (+ 4-bit), the embedded default, attention and kernels."""
