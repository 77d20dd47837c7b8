//! The four sock_addr entry points. Each reads the destination from its
//! context, has it judged ([`decide::judge`]) and reported; a sock_addr
//! program returns 1 to let the call proceed and 0 to fail it with EPERM.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, generated::bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use tollgate_common::{Hook, Verdict, family, flow_flags};

use crate::{
    decide::{self, Destination},
    dns,
    report::{self, Origin, Sender},
};

#[cgroup_sock_addr(connect4)]
pub fn tollgate_connect4(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Connect4, destination_v4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn tollgate_connect6(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Connect6, destination_v6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tollgate_sendmsg4(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Sendmsg4, destination_v4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tollgate_sendmsg6(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Sendmsg6, destination_v6(&ctx))
}

#[inline(always)]
fn run(ctx: &SockAddrContext, hook: Hook, dst: Destination) -> i32 {
    // SAFETY: helpers without preconditions beyond a valid context.
    let (cgroup_id, socket_cookie) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    let judgement = decide::judge(cgroup_id, &dst);
    let origin = Origin {
        hook,
        cgroup_id,
        socket_cookie,
        sender: Sender::CurrentTask,
    };
    report::decision(&origin, &judgement, &dst);
    if judgement.verdict == Verdict::Denied {
        return 0;
    }
    dns::note_resolver_socket(ctx, cgroup_id, &dst);
    1
}

// Fields are read one at a time: the verifier rejects copying the context.

#[inline(always)]
fn destination_v4(ctx: &SockAddrContext) -> Destination {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr; these are plain loads
    // of context fields the verifier allows for this program type.
    let (ip4, port, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    Destination {
        family: family::INET,
        addr: [ip4, 0, 0, 0],
        port: port_from_ctx(port),
        protocol: protocol as u8,
        flags: 0,
    }
}

#[inline(always)]
fn destination_v6(ctx: &SockAddrContext) -> Destination {
    let sa = ctx.sock_addr;
    // SAFETY: as above; user_ip6 is read word by word.
    let (w0, w1, w2, w3, port, protocol) = unsafe {
        (
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    let port = port_from_ctx(port);
    let protocol = protocol as u8;
    // ::ffff:a.b.c.d goes out as IPv4 and is judged by the IPv4 rules.
    if w0 == 0 && w1 == 0 && u32::from_be(w2) == 0x0000_ffff {
        return Destination {
            family: family::INET,
            addr: [w3, 0, 0, 0],
            port,
            protocol,
            flags: flow_flags::V4_MAPPED,
        };
    }
    Destination {
        family: family::INET6,
        addr: [w0, w1, w2, w3],
        port,
        protocol,
        flags: 0,
    }
}

/// `user_port` holds the port in network order in its low 16 bits.
#[inline(always)]
fn port_from_ctx(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}
