//! One in-memory file as a `FileSource`, for the file targets.

use ldm_web::loader::{FileSource, LocalFuture};
use ldm_web::{Error, Result};

pub struct MemorySource {
    pub name: &'static str,
    pub data: Vec<u8>,
}

impl FileSource for MemorySource {
    fn describe(&self, path: &str) -> String {
        format!("fuzz:{path}")
    }
    fn size<'b>(&'b self, path: &'b str) -> LocalFuture<'b, Result<Option<u64>>> {
        let n = (path == self.name).then_some(self.data.len() as u64);
        Box::pin(async move { Ok(n) })
    }
    fn read_range<'b>(&'b self, path: &'b str, start: u64, len: u64) -> LocalFuture<'b, Result<Vec<u8>>> {
        Box::pin(async move {
            let end = start.checked_add(len).filter(|&e| path == self.name && e <= self.data.len() as u64);
            match end {
                Some(e) => Ok(self.data[start as usize..e as usize].to_vec()),
                None => Err(Error::Io(format!("fuzz:{path}: bytes {start}+{len} are past the end"))),
            }
        })
    }
}
