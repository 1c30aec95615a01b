//! Pod egress to addresses outside the cluster leaves with the node's
//! address (masquerade); pod-to-pod traffic keeps pod addresses. One
//! nftables table, `ip weft`, replaced atomically: nothing else in the
//! ruleset is touched.

use ipnet::Ipv4Net;
use std::io::Write;
use std::process::{Command, Stdio};

/// The ruleset for `range`. Deleting and re-creating the table in one
/// transaction makes this idempotent and atomic.
pub fn ruleset(range: Ipv4Net) -> String {
    format!(
        "table ip weft {{}}\n\
         delete table ip weft\n\
         table ip weft {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {range} ip daddr != {range} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Installs the masquerade rule with `nft`.
pub fn install(range: Ipv4Net) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft (is nftables installed?): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset(range).as_bytes())
            .map_err(|e| format!("cannot feed nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("nft failed: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft refused the masquerade rule: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_masquerades_only_traffic_leaving_the_range() {
        let r = ruleset("10.32.0.0/12".parse().unwrap());
        assert!(r.contains("ip saddr 10.32.0.0/12 ip daddr != 10.32.0.0/12 masquerade"));
        assert!(r.starts_with("table ip weft {}\ndelete table ip weft\n"));
    }
}
