//! Models served over HTTP(S), read with range requests like the browser does.

use ldm_web::loader::{FileSource, LocalFuture};
use ldm_web::{Error, Result};

/// A model folder at a base URL (`{base}/unet/config.json`, ...).
pub struct HttpSource {
    base: String,
    agent: ureq::Agent,
}

impl HttpSource {
    /// Files under `base`.
    pub fn new(base: &str) -> Result<Self> {
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        Ok(Self { base: base.trim_end_matches('/').to_string(), agent })
    }
    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }
}

impl FileSource for HttpSource {
    fn describe(&self, path: &str) -> String {
        self.url(path)
    }
    fn size<'a>(&'a self, path: &'a str) -> LocalFuture<'a, Result<Option<u64>>> {
        Box::pin(async move {
            let url = self.url(path);
            let resp = self.agent.head(&url).call().map_err(|e| Error::Io(format!("cannot reach {url}: {e}")))?;
            match resp.status().as_u16() {
                404 | 410 => Ok(None),
                200..=299 => resp
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .map(Some)
                    .ok_or_else(|| Error::Io(format!("{url} sent no Content-Length; the server must report file sizes"))),
                s => Err(Error::Io(format!("{url} answered HTTP {s}"))),
            }
        })
    }
    fn read_range<'a>(&'a self, path: &'a str, start: u64, len: u64) -> LocalFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let url = self.url(path);
            if len == 0 {
                return Ok(Vec::new());
            }
            let range = format!("bytes={start}-{}", start + len - 1);
            let mut resp = self.agent.get(&url).header("Range", &range).call().map_err(|e| Error::Io(format!("cannot reach {url}: {e}")))?;
            let status = resp.status().as_u16();
            let body = resp.body_mut().with_config().limit(len.saturating_add(1 << 20)).read_to_vec();
            match status {
                206 => {
                    let body = body.map_err(|e| Error::Io(format!("reading {url}: {e}")))?;
                    if body.len() as u64 != len {
                        return Err(Error::Io(format!("{url} sent {} bytes for range {range}", body.len())));
                    }
                    Ok(body)
                }
                200 => Err(Error::Io(format!("{url} ignored the Range header; serve the model from a server with HTTP range support"))),
                s => Err(Error::Io(format!("{url} answered HTTP {s} for range {range}"))),
            }
        })
    }
}
