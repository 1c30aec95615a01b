//! What makes a policy unreadable. API objects are untrusted input: a bad
//! one is a typed error for the log, never a panic, and it fails closed
//! (see `Policy::fails_closed` and the crate docs).

use serde::{Deserialize, Serialize};

use crate::addrs::Cidr;
use crate::model::{IpBlock, Peer, Policy, PolicyType, Port, PortSpec, Rule};
use crate::selector::SelectorError;

/// One problem and where it is, as a path into the policy's spec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{at}: {problem}")]
pub struct PolicyError {
    pub at: String,
    pub problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Problem {
    #[error(transparent)]
    Selector(#[from] SelectorError),
    #[error("a peer needs podSelector, namespaceSelector or ipBlock")]
    EmptyPeer,
    #[error("{0:?} is not a CIDR")]
    BadCidr(String),
    #[error("except {except:?} is not a strict subset of cidr {cidr:?}")]
    ExceptOutside { except: String, cidr: String },
    #[error("port 0 is not a port")]
    PortZero,
    #[error("endPort needs a numeric port")]
    EndPortWithoutNumber,
    #[error("endPort {end_port} is below port {port}")]
    EndPortBelowPort { port: u16, end_port: u16 },
}

impl Policy {
    /// Every problem of the policy; empty when it is valid.
    pub fn problems(&self) -> Vec<PolicyError> {
        let mut out = Vec::new();
        if let Err(e) = self.pod_selector.check() {
            out.push(error("podSelector", e.into()));
        }
        for direction in [PolicyType::Ingress, PolicyType::Egress] {
            let (name, peers) = match direction {
                PolicyType::Ingress => ("ingress", "from"),
                PolicyType::Egress => ("egress", "to"),
            };
            for (i, rule) in self.rules(direction).iter().enumerate() {
                rule_problems(rule, &format!("{name}[{i}]"), peers, &mut out);
            }
        }
        out
    }

    /// A policy that cannot be read still isolates what it selects and
    /// allows nothing: it fails closed.
    pub fn fails_closed(&self) -> bool {
        !self.problems().is_empty()
    }
}

fn error(at: &str, problem: Problem) -> PolicyError {
    PolicyError {
        at: at.to_string(),
        problem,
    }
}

fn rule_problems(rule: &Rule, at: &str, peers_field: &str, out: &mut Vec<PolicyError>) {
    for (i, peer) in rule.peers.iter().flatten().enumerate() {
        let at = format!("{at}.{peers_field}[{i}]");
        match peer {
            Peer::Pods {
                pod_selector: None,
                namespace_selector: None,
            } => out.push(error(&at, Problem::EmptyPeer)),
            Peer::Pods {
                pod_selector,
                namespace_selector,
            } => {
                for (field, selector) in [
                    ("podSelector", pod_selector),
                    ("namespaceSelector", namespace_selector),
                ] {
                    if let Some(Err(e)) = selector.as_ref().map(|s| s.check()) {
                        out.push(error(&format!("{at}.{field}"), e.into()));
                    }
                }
            }
            Peer::IpBlock(block) => {
                if let Err(problem) = block.parse() {
                    out.push(error(&format!("{at}.ipBlock"), problem));
                }
            }
        }
    }
    for (i, spec) in rule.ports.iter().flatten().enumerate() {
        if let Err(problem) = spec.check() {
            out.push(error(&format!("{at}.ports[{i}]"), problem));
        }
    }
}

impl IpBlock {
    /// The cidr and its excepts, each except a strict subset of the cidr.
    pub fn parse(&self) -> Result<(Cidr, Vec<Cidr>), Problem> {
        let cidr = Cidr::parse(&self.cidr).ok_or_else(|| Problem::BadCidr(self.cidr.clone()))?;
        let mut except = Vec::with_capacity(self.except.len());
        for text in &self.except {
            let hole = Cidr::parse(text).ok_or_else(|| Problem::BadCidr(text.clone()))?;
            if !cidr.strictly_holds(&hole) {
                return Err(Problem::ExceptOutside {
                    except: text.clone(),
                    cidr: self.cidr.clone(),
                });
            }
            except.push(hole);
        }
        Ok((cidr, except))
    }
}

impl PortSpec {
    /// Port names are not checked for IANA syntax: any name is looked up
    /// as it is, and one no container has matches nothing.
    fn check(&self) -> Result<(), Problem> {
        match (&self.port, self.end_port) {
            (Some(Port::Number(0)), _) | (_, Some(0)) => Err(Problem::PortZero),
            (Some(Port::Number(port)), Some(end_port)) if end_port < *port => {
                Err(Problem::EndPortBelowPort {
                    port: *port,
                    end_port,
                })
            }
            (None | Some(Port::Name(_)), Some(_)) => Err(Problem::EndPortWithoutNumber),
            _ => Ok(()),
        }
    }
}
