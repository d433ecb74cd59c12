//! Legacy port-I/O devices.
