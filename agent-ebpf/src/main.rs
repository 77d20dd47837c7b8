//! Tollgate's kernel programs.
//!
//! Four `cgroup/sock_addr` hooks ([`hooks`]) decide every egress connection
//! of TCP and UDP sockets (TCP connect, connected and unconnected UDP) by
//! destination, using maps the agent writes; a `cgroup_skb` egress program
//! ([`packet`]) decides each packet of every other inet socket (raw, ICMP
//! echo, SCTP) by the same rules; a `tc` ingress program on the node's side
//! of each enforced pod's link ([`frame`]) decides every frame there that
//! no inet socket sent (packet sockets). The decision logic lives in [`decide`],
//! the reporting (counters, dedup, ring buffer) in [`report`]; each hook
//! only reads its context. A `cgroup_skb` ingress program ([`dns`]) learns
//! FQDN rules' addresses from DNS answers.
#![no_std]
#![no_main]
// Atomic adds without a CAS: the BPF target has no atomic RMW types.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod decide;
mod dns;
mod frame;
mod hooks;
mod maps;
mod packet;
mod report;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here; BPF has no way to unwind.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
