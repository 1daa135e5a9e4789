//! The NFSv3 source (work in progress: being written).

use async_trait::async_trait;

use super::{Attr, DirEntry, Handle, NfsUrl, Result, Source, SourceError, SourceOptions};

pub struct NfsSource {
    id: String,
}

impl NfsSource {
    pub async fn connect(url: &NfsUrl, _options: &SourceOptions) -> Result<Self> {
        Err(SourceError::Invalid(format!("{url}: NFS sources are not implemented yet")))
    }
}

#[async_trait]
impl Source for NfsSource {
    fn id(&self) -> &str {
        &self.id
    }
    async fn root(&self) -> Result<(Handle, Attr)> {
        unimplemented!()
    }
    async fn lookup(&self, _dir: &Handle, _name: &[u8]) -> Result<(Handle, Attr)> {
        unimplemented!()
    }
    async fn getattr(&self, _node: &Handle) -> Result<Attr> {
        unimplemented!()
    }
    async fn read_dir(&self, _dir: &Handle) -> Result<Vec<DirEntry>> {
        unimplemented!()
    }
    async fn read(&self, _file: &Handle, _offset: u64, _len: u32) -> Result<Vec<u8>> {
        unimplemented!()
    }
    async fn read_link(&self, _link: &Handle) -> Result<Vec<u8>> {
        unimplemented!()
    }
}
