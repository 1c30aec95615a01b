//! Every device name and port of weft's data path, in one place.

/// UDP port of the control plane, which the sleeve's frames share.
pub const CONTROL_PORT: u16 = 6783;
/// Default name of the bridge pods attach to.
pub const BRIDGE_NAME: &str = "weft";
/// Default name of the VXLAN device.
pub const VXLAN_NAME: &str = "weft-vxlan";
/// UDP port of weft's VXLAN traffic (Weave Net's fastdp port; gossip is 6783).
pub const VXLAN_PORT: u16 = 6784;
/// VXLAN network identifier of weft's overlay: 0x77_65_66 is "wef" in ASCII.
/// Any fixed value works as long as every node uses the same one; a distinct
/// value keeps weft's traffic apart from other VXLAN users on the same port.
pub const DEFAULT_VNI: u32 = 0x0077_6566;
/// Route protocol number (`rtm_protocol`) marking weft's routes. 177 is not
/// assigned in iproute2's `rt_protos` (which lists 0-18, 42, 99, 186-192) and
/// not used by the usual routing daemons or CNI plugins.
pub const ROUTE_PROTOCOL: u8 = 177;
/// The sleeve's TUN device. Its overhead (outer IPv4, UDP, frame header:
/// 42 bytes) is below VXLAN's 50, so the pod MTU fits both; sealed frames
/// add 32 more, so their TCP segments are cut smaller to fit the underlay.
pub const SLEEVE_DEVICE: &str = "weft-sleeve";
/// Host-side veth devices of pods start so (`vethwf` + a hash).
pub const POD_VETH_PREFIX: &str = "vethwf";
