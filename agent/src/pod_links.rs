//! Pods' links as the node sees them: the node's side of each veth whose
//! other side is in a pod's network namespace, found over rtnetlink. Every
//! frame the pod sends enters the node there, which is where the frame
//! hook judges what no inet socket sent (agent-ebpf `frame.rs`).
//!
//! The kernel names the namespace at a veth's other end by an id local to
//! the node's namespace (`IFLA_LINK_NETNSID`); `RTM_GETNSID` with a
//! namespace file tells the id of a pod's namespace. Dumping the links
//! first makes the kernel give an id to every namespace a link reaches.

use std::{fs::File, io, os::fd::AsRawFd};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// One veth of the node, whose other end is in another namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeVeth {
    pub ifindex: u32,
    pub name: String,
    /// The id, in this namespace, of the namespace of the other end.
    peer_netnsid: i32,
}

/// The node's veths, as one dump found them, and a socket to ask more.
pub struct NodeLinks {
    socket: Socket,
    veths: Vec<NodeVeth>,
    sequence: u32,
}

impl NodeLinks {
    /// Dumps this namespace's links.
    pub fn dump() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let mut links = Self {
            socket,
            veths: Vec::new(),
            sequence: 0,
        };
        let replies = links.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        links.veths = replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => veth(&link),
                _ => None,
            })
            .collect();
        Ok(links)
    }

    /// The node's veths whose other end is in `namespace` (a
    /// `/proc/PID/ns/net` file).
    pub fn into_namespace(&mut self, namespace: &File) -> io::Result<Vec<NodeVeth>> {
        let mut message = NsidMessage::default();
        message
            .attributes
            .push(NsidAttribute::Fd(namespace.as_raw_fd() as u32));
        let replies = self.request(RouteNetlinkMessage::GetNsId(message), 0)?;
        let Some(id) = replies.iter().find_map(|reply| match reply {
            RouteNetlinkMessage::NewNsId(nsid) => nsid.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) => Some(*id),
                _ => None,
            }),
            _ => None,
        }) else {
            return Ok(Vec::new());
        };
        // -1: no link of this namespace reaches that one.
        if id < 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .veths
            .iter()
            .filter(|veth| veth.peer_netnsid == id)
            .cloned()
            .collect())
    }

    /// Sends `message` and gathers the replies until the last (or the
    /// dump's end); a refusal is an error.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;

        let dump = flags & NLM_F_DUMP != 0;
        let mut replies = Vec::new();
        loop {
            let (received, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < received.len() {
                let reply: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&received[offset..])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let length = reply.header.length as usize;
                if reply.header.sequence_number == self.sequence {
                    match reply.payload {
                        NetlinkPayload::Done(_) => return Ok(replies),
                        NetlinkPayload::Error(error) if error.code.is_some() => {
                            return Err(error.to_io());
                        }
                        NetlinkPayload::Error(_) => return Ok(replies),
                        NetlinkPayload::InnerMessage(inner) => {
                            replies.push(inner);
                            if !dump {
                                return Ok(replies);
                            }
                        }
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

/// The link as a [`NodeVeth`], if it is a veth whose other end is in
/// another namespace.
fn veth(link: &LinkMessage) -> Option<NodeVeth> {
    let mut name = None;
    let mut peer_netnsid = None;
    let mut is_veth = false;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkNetNsId(id) => peer_netnsid = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                is_veth = infos
                    .iter()
                    .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    is_veth.then_some(NodeVeth {
        ifindex: link.header.index,
        name: name?,
        peer_netnsid: peer_netnsid?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_of_this_namespace_succeeds_and_its_own_namespace_has_no_veth_into_it() {
        let mut links = NodeLinks::dump().unwrap();
        let own = File::open("/proc/self/ns/net").unwrap();
        assert_eq!(links.into_namespace(&own).unwrap(), Vec::new());
    }
}
