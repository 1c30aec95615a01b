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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, Rule};
    use crate::selector::{Operator, Requirement};
    use crate::testkit::*;

    fn with_rule(rule: Rule) -> Policy {
        let mut p = policy("prod", "p", &[]);
        p.ingress = Some(vec![rule]);
        p
    }

    fn problems(rule: Rule) -> Vec<Problem> {
        with_rule(rule)
            .problems()
            .into_iter()
            .map(|e| e.problem)
            .collect()
    }

    fn one_port(spec: PortSpec) -> Rule {
        rule(vec![], vec![spec])
    }

    fn one_block(cidr: &str, except: &[&str]) -> Rule {
        rule(vec![block(cidr, except)], vec![])
    }

    #[test]
    fn valid_policies_have_no_problems() {
        let valid = [
            one_block("10.0.0.0/8", &["10.1.0.0/16", "10.2.3.4/32"]),
            one_block("10.0.0.1/8", &[]),
            one_block("fd00::/8", &["fd00:1::/32"]),
            one_port(port(Protocol::Tcp, Some(Port::Number(80)), Some(80))),
            one_port(port(Protocol::Udp, Some(Port::Number(1)), Some(65535))),
            one_port(port(
                Protocol::Sctp,
                Some(Port::Name("anything".into())),
                None,
            )),
            rule(
                vec![pods_peer(Some(&[]), None), pods_peer(None, Some(&[]))],
                vec![],
            ),
            Rule::default(),
        ];
        for rule in valid {
            assert_eq!(problems(rule.clone()), [], "{rule:?}");
        }
    }

    #[test]
    fn ip_block_except_must_lie_strictly_inside_cidr() {
        for except in ["10.0.0.0/8", "11.0.0.0/16", "0.0.0.0/0", "fd00::/16"] {
            assert!(
                matches!(
                    problems(one_block("10.0.0.0/8", &[except]))[..],
                    [Problem::ExceptOutside { .. }]
                ),
                "{except}"
            );
        }
    }

    #[test]
    fn ip_block_needs_cidrs() {
        for (cidr, except) in [
            ("10.0.0.0", &[][..]),
            ("", &[]),
            ("10.0.0.0/8", &["10.1.0.0"]),
        ] {
            assert!(matches!(
                problems(one_block(cidr, except))[..],
                [Problem::BadCidr(_)]
            ));
        }
    }

    #[test]
    fn end_port_needs_a_number_not_below_port() {
        let cases = [
            (
                port(Protocol::Tcp, Some(Port::Number(90)), Some(80)),
                Problem::EndPortBelowPort {
                    port: 90,
                    end_port: 80,
                },
            ),
            (
                port(Protocol::Tcp, Some(Port::Name("http".into())), Some(80)),
                Problem::EndPortWithoutNumber,
            ),
            (
                port(Protocol::Tcp, None, Some(80)),
                Problem::EndPortWithoutNumber,
            ),
            (
                port(Protocol::Tcp, Some(Port::Number(0)), None),
                Problem::PortZero,
            ),
        ];
        for (spec, problem) in cases {
            assert_eq!(problems(one_port(spec)), [problem]);
        }
    }

    #[test]
    fn a_peer_needs_a_selector_or_a_block() {
        assert_eq!(
            problems(rule(vec![pods_peer(None, None)], vec![])),
            [Problem::EmptyPeer]
        );
    }

    #[test]
    fn problems_say_where_they_are() {
        let bad = Requirement {
            key: "app".into(),
            operator: Operator::Exists,
            values: vec!["x".into()],
        };
        let mut p = with_rule(rule(vec![pods_peer(None, Some(&[]))], vec![]));
        if let Some(Peer::Pods {
            namespace_selector: Some(s),
            ..
        }) = p
            .ingress
            .as_mut()
            .and_then(|rules| rules[0].peers.as_mut())
            .map(|peers| &mut peers[0])
        {
            s.match_expressions.push(bad.clone());
        }
        p.egress = Some(vec![
            Rule::default(),
            one_port(port(Protocol::Tcp, Some(Port::Number(0)), None)),
        ]);
        p.pod_selector.match_expressions.push(bad);
        let text: Vec<String> = p.problems().iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "podSelector: Exists on \"app\" takes no values",
                "ingress[0].from[0].namespaceSelector: Exists on \"app\" takes no values",
                "egress[1].ports[0]: port 0 is not a port",
            ]
        );
        assert!(p.fails_closed());
    }

    #[test]
    fn host_network_pods_are_never_selected() {
        let mut host = pod("prod", "agent", &[], "192.168.1.1");
        host.host_network = true;
        let p = policy("prod", "all", &[]);
        assert!(!p.selects(&host));
        host.host_network = false;
        assert!(p.selects(&host));
    }
}
