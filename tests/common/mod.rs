pub mod csi;
pub mod daemon;
pub mod data;
pub mod ganesha;
pub mod mount;
