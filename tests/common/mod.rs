pub mod data;
pub mod ganesha;
pub mod mount;
