pub mod csi;
pub mod daemon;
pub mod data;
pub mod ganesha;
pub mod k8s;
pub mod mount;
pub mod paths;
pub mod standin_provisioner;
