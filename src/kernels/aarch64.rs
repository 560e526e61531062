//! aarch64 kernels (todo)
