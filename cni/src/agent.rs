//! The weft agent's local API (its Unix socket), as the plugin uses it:
//! weft-api's client, its errors turned into CNI error codes.

use crate::spec::{CniError, code};
use std::path::Path;
use std::time::Duration;
use weft_api::{Attachment, Client, ClientError, ErrorKind, NodeStatus};

/// How long ADD waits for an address before telling the runtime to retry.
const ALLOCATE_WAIT: Duration = Duration::from_secs(20);
/// DEL deletes the veth itself when the agent does not take it this fast.
const DELETE_VETH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Agent {
    client: Client,
}

impl Agent {
    pub fn new(socket: &Path) -> Agent {
        Agent {
            client: Client::new(socket),
        }
    }

    pub fn allocate(&self, attachment: &str) -> Result<Attachment, CniError> {
        self.client
            .allocate(attachment, ALLOCATE_WAIT)
            .map_err(cni_error)
    }

    pub fn release(&self, attachment: &str) -> Result<(), CniError> {
        self.client.release(attachment).map(drop).map_err(cni_error)
    }

    pub fn check(&self, attachment: &str) -> Result<Attachment, CniError> {
        self.client.check(attachment).map_err(cni_error)
    }

    /// The attachments holding an address on this node.
    pub fn list(&self) -> Result<Vec<String>, CniError> {
        let held = self.client.list().map_err(cni_error)?;
        Ok(held.into_iter().map(|a| a.container_id).collect())
    }

    /// Asks the agent to delete a pod's host veth in the background.
    pub fn delete_veth(&self, interface: &str) -> Result<(), CniError> {
        self.client
            .clone()
            .with_timeout(DELETE_VETH_TIMEOUT)
            .delete_veth(interface)
            .map_err(cni_error)
    }

    pub fn status(&self) -> Result<NodeStatus, CniError> {
        self.client.status().map_err(cni_error)
    }
}

/// The agent away or busy is worth a retry; a bad request is ours.
fn cni_error(e: ClientError) -> CniError {
    match e {
        ClientError::Unreachable { path, source } => CniError::new(
            code::TRY_AGAIN,
            format!(
                "weft agent not reachable at {}: is the weft DaemonSet running on this node?",
                path.display()
            ),
        )
        .with_details(source.to_string()),
        ClientError::Malformed(_) => CniError::new(code::IO, e.to_string()),
        ClientError::Api(e) => {
            let code = match e.kind {
                ErrorKind::Pending | ErrorKind::Unavailable => code::TRY_AGAIN,
                ErrorKind::BadRequest => code::IO,
                ErrorKind::Refused | ErrorKind::Unknown => code::REFUSED,
            };
            CniError::new(code, e.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::ApiError;

    #[test]
    fn agent_errors_keep_their_cni_codes() {
        let api = |kind| {
            cni_error(ClientError::Api(ApiError {
                kind,
                message: "m".into(),
            }))
            .code
        };
        assert_eq!(api(ErrorKind::Pending), code::TRY_AGAIN);
        assert_eq!(api(ErrorKind::Unavailable), code::TRY_AGAIN);
        assert_eq!(api(ErrorKind::BadRequest), code::IO);
        assert_eq!(api(ErrorKind::Refused), code::REFUSED);
        assert_eq!(api(ErrorKind::Unknown), code::REFUSED);
        let away = cni_error(ClientError::Unreachable {
            path: "/run/weft/weft.sock".into(),
            source: std::io::ErrorKind::NotFound.into(),
        });
        assert_eq!(away.code, code::TRY_AGAIN);
        assert!(away.msg.contains("/run/weft/weft.sock"), "{}", away.msg);
        let nonsense = cni_error(ClientError::Malformed("x".into()));
        assert_eq!(nonsense.code, code::IO);
        assert_eq!(nonsense.msg, "the weft agent answered nonsense: x");
    }
}
