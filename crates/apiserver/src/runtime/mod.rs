//! The VM runtime: kernel, initramfs, QEMU microvm runner and its helper processes.
