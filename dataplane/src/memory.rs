//! An in-memory dataplane for the agent's tests and the simulator.

use crate::{Dataplane, DataplaneError, Desired, RouteDevice};

/// Records the last applied [`Desired`] (normalized: peers and routes sorted
/// and de-duplicated) and counts the reconciliations that changed it.
#[derive(Clone, Debug, Default)]
pub struct MemoryDataplane {
    state: Desired,
    changes: u64,
    reconciles: u64,
    teardowns: u64,
    fail_vxlan: Option<String>,
}

impl MemoryDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state last applied (empty after `new` or `teardown`).
    pub fn state(&self) -> &Desired {
        &self.state
    }

    /// How many `reconcile` calls changed the state.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// How many `reconcile` calls succeeded (changing anything or not).
    pub fn reconciles(&self) -> u64 {
        self.reconciles
    }

    /// How many times `teardown` was called.
    pub fn teardowns(&self) -> u64 {
        self.teardowns
    }

    /// From now on, `reconcile` with a VXLAN device fails with
    /// [`DataplaneError::Vxlan`] and this reason (as on a node without the
    /// vxlan module), so tests can exercise the agent's fallback. `None`
    /// stops failing.
    pub fn fail_vxlan(&mut self, reason: Option<String>) {
        self.fail_vxlan = reason;
    }
}

impl Dataplane for MemoryDataplane {
    fn reconcile(&mut self, desired: &Desired) -> Result<(), DataplaneError> {
        if let (Some(reason), Some(vxlan)) = (&self.fail_vxlan, &desired.vxlan) {
            return Err(DataplaneError::Vxlan {
                name: vxlan.name.clone(),
                action: "create",
                reason: reason.clone(),
            });
        }
        // As the kernel would: a route into the sleeve next to VXLAN needs
        // the sleeve's device.
        if desired.vxlan.is_some()
            && desired.sleeve.is_none()
            && let Some(r) = desired
                .routes
                .iter()
                .find(|r| r.device == RouteDevice::Sleeve)
        {
            return Err(DataplaneError::Route {
                action: "add",
                prefix: r.prefix,
                next_hop: r.next_hop.to_string(),
                reason: "it should go into the sleeve, and there is no sleeve device".into(),
            });
        }
        let next = desired.normalized();
        if next != self.state {
            self.state = next;
            self.changes += 1;
        }
        self.reconciles += 1;
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), DataplaneError> {
        self.state = Desired::default();
        self.teardowns += 1;
        Ok(())
    }

    fn delete_device(&mut self, _name: &str) -> Result<(), DataplaneError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{RemotePeer, VxlanSpec, vtep_mac};

    #[test]
    fn counts_only_real_changes() {
        let mut dp = MemoryDataplane::new();
        let peer = |n: u8| RemotePeer {
            underlay: Ipv4Addr::new(192, 168, 1, n),
            mac: vtep_mac(n.into()),
        };
        let mut d = Desired {
            vxlan: Some(VxlanSpec::new(
                Ipv4Addr::new(192, 168, 1, 11),
                1450,
                vtep_mac(11),
            )),
            peers: vec![peer(13), peer(12)],
            ..Default::default()
        };
        dp.reconcile(&d).unwrap();
        d.peers.reverse();
        dp.reconcile(&d).unwrap();
        assert_eq!((dp.changes(), dp.reconciles()), (1, 2));
        assert_eq!(dp.state().peers, vec![peer(12), peer(13)]);

        dp.fail_vxlan(Some("Operation not supported".into()));
        let err = dp.reconcile(&d).unwrap_err();
        assert!(matches!(err, DataplaneError::Vxlan { .. }), "{err}");
        assert_eq!(dp.changes(), 1);

        dp.teardown().unwrap();
        assert_eq!(dp.state(), &Desired::default());
    }
}
