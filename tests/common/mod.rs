pub mod csi;
pub mod data;
pub mod ganesha;
pub mod mount;
