//! DNS answers in userspace, pure logic: the twin of the kernel's bounded
//! answer parser ([`twin`]), a general decoder for what the kernel leaves
//! to the agent ([`full`]), and DNS over TCP reassembly ([`tcp`]).

pub mod full;
pub mod tcp;
pub mod twin;

/// The conformance check shared by the property tests and the fuzzer: the
/// twin must not panic on `message`, and when both it and the general
/// decoder accept `message`, they must read the same header, question and
/// addresses. The twin may accept what the decoder refuses (it does not
/// follow owner-name pointers or read the authority and additional
/// sections), and refuse what is beyond its bounds.
pub fn check_twin_agrees(message: &[u8]) -> Result<(), String> {
    let Ok(twin) = twin::parse(message) else {
        return Ok(());
    };
    let full = match full::decode(message) {
        Ok(full) => full,
        Err(full::DecodeError::Invalid(_)) => return Ok(()),
        Err(refused) => {
            return Err(format!(
                "the twin accepts what the decoder refuses: {refused}"
            ));
        }
    };
    let addresses = full.addresses();
    let ours = (twin.id, &twin.name, twin.qtype, twin.rcode, &twin.addresses);
    let theirs = (full.id, &full.name, full.qtype, full.rcode, &addresses);
    if ours != theirs {
        return Err(format!(
            "(id, name, qtype, rcode, addresses): twin {ours:?}, decoder {theirs:?}"
        ));
    }
    Ok(())
}
