//! Wire-format tests for `tincan-proto`: round trips, pinned bytes, hostile
//! input and framing.
//!
//! - Property tests: every wire enum survives `codec::encode` → `codec::decode`.
//! - Golden bytes: one fixed value per variant with its exact postcard bytes.
//!   Postcard encodes enum variant indices as varints, so reordering or
//!   inserting a variant (instead of appending) breaks these on purpose.
//! - Malformed input: truncations, bit flips, trailing bytes, invalid names and
//!   unknown variant indices are errors, never panics.
//! - Framing: the typed `Codec` (4-byte big-endian length + postcard body).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

use tincan_proto::codec::{self, Encoded};
use tincan_proto::peer::{Refusal, ToReceiver, ToSender};
use tincan_proto::tracker::{
    CircuitRefusal, FromTracker, HeldMessage, HoldResult, LIST_PAGE, Notice, NoticeKind, PeerInfo,
    PresenceChange, RejectReason, SealKeyEntry, SignedSealKey, ToTracker,
};
use tincan_proto::{Codec, FrameError, MAX_FRAME_LEN, MAX_LOCAL_ADDRS, MessageId, Name, PeerId};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn name(s: &str) -> Name {
    Name::parse(s).unwrap()
}

/// Hex to bytes, ignoring whitespace so golden literals can be grouped by field.
fn unhex(s: &str) -> Vec<u8> {
    let compact: String = s.split_whitespace().collect();
    hex::decode(compact).unwrap()
}

fn round_trip<T: Serialize + DeserializeOwned>(value: &T) -> T {
    let bytes = codec::encode(value).unwrap();
    codec::decode(&bytes).unwrap()
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn arb_name() -> impl Strategy<Value = Name> {
    "[A-Za-z0-9_-]{1,32}".prop_map(|s| Name::parse(&s).unwrap())
}

fn arb_peer_id() -> impl Strategy<Value = PeerId> {
    any::<[u8; 32]>().prop_map(PeerId)
}

fn arb_message_id() -> impl Strategy<Value = MessageId> {
    any::<[u8; 16]>().prop_map(MessageId)
}

/// IPv4 and IPv6 addresses. IPv6 flow info and scope id are always zero: they
/// are not on the wire (see `ipv6_flowinfo_and_scope_id_are_not_carried_on_the_wire`).
fn arb_socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

fn arb_local_addrs() -> impl Strategy<Value = Vec<SocketAddr>> {
    prop::collection::vec(arb_socket_addr(), 0..=MAX_LOCAL_ADDRS)
}

fn arb_peer_info() -> impl Strategy<Value = PeerInfo> {
    (
        arb_name(),
        arb_peer_id(),
        arb_socket_addr(),
        arb_local_addrs(),
    )
        .prop_map(|(name, id, observed, local_addrs)| PeerInfo {
            name,
            id,
            observed,
            local_addrs,
        })
}

fn arb_presence_change() -> impl Strategy<Value = PresenceChange> {
    prop_oneof![
        arb_peer_info().prop_map(PresenceChange::Joined),
        (arb_name(), arb_peer_id()).prop_map(|(name, id)| PresenceChange::Left { name, id }),
    ]
}

fn arb_reject_reason() -> impl Strategy<Value = RejectReason> {
    prop::sample::select(vec![
        RejectReason::InvalidName,
        RejectReason::NameInUse,
        RejectReason::NameBound,
        RejectReason::UnsupportedVersion,
        RejectReason::TrackerFull,
        RejectReason::ProtocolViolation,
        RejectReason::Unavailable,
    ])
}

fn arb_circuit_refusal() -> impl Strategy<Value = CircuitRefusal> {
    prop::sample::select(vec![
        CircuitRefusal::NotOnline,
        CircuitRefusal::NotEnrolled,
        CircuitRefusal::TooManyCircuits,
        CircuitRefusal::TrackerBusy,
        CircuitRefusal::Declined,
        CircuitRefusal::Throttled,
    ])
}

/// Opaque byte strings (signatures, receipts, sealed messages). Up to 300
/// bytes, so both one- and two-byte varint lengths occur.
fn arb_blob() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..300)
}

fn arb_signed_seal_key() -> impl Strategy<Value = SignedSealKey> {
    (any::<[u8; 32]>(), arb_blob()).prop_map(|(key, sig)| SignedSealKey { key, sig })
}

fn arb_seal_key_entry() -> impl Strategy<Value = SealKeyEntry> {
    (arb_name(), arb_peer_id(), arb_signed_seal_key()).prop_map(|(name, id, seal)| SealKeyEntry {
        name,
        id,
        seal,
    })
}

fn arb_hold_result() -> impl Strategy<Value = HoldResult> {
    prop_oneof![
        any::<u64>().prop_map(|expires_at| HoldResult::Held { expires_at }),
        Just(HoldResult::UnknownName),
        Just(HoldResult::KeyMismatch),
        Just(HoldResult::MailboxFull),
        Just(HoldResult::TooLarge),
        Just(HoldResult::Unavailable),
    ]
}

fn arb_held_message() -> impl Strategy<Value = HeldMessage> {
    (
        arb_name(),
        arb_peer_id(),
        arb_message_id(),
        any::<u64>(),
        arb_blob(),
    )
        .prop_map(|(from, from_id, id, stored_at, sealed)| HeldMessage {
            from,
            from_id,
            id,
            stored_at,
            sealed,
        })
}

fn arb_notice_kind() -> impl Strategy<Value = NoticeKind> {
    prop_oneof![
        (arb_peer_id(), arb_blob()).prop_map(|(by, receipt)| NoticeKind::Delivered { by, receipt }),
        Just(NoticeKind::Expired),
        Just(NoticeKind::Rejected),
    ]
}

fn arb_notice() -> impl Strategy<Value = Notice> {
    (arb_message_id(), arb_name(), arb_notice_kind()).prop_map(|(id, to, kind)| Notice {
        id,
        to,
        kind,
    })
}

fn arb_refusal() -> impl Strategy<Value = Refusal> {
    prop::sample::select(vec![Refusal::UnknownSender, Refusal::TooLarge])
}

fn arb_to_tracker() -> impl Strategy<Value = ToTracker> {
    prop_oneof![
        (
            arb_name(),
            any::<u16>(),
            arb_local_addrs(),
            prop::option::of(prop::collection::vec(arb_name(), 0..4))
        )
            .prop_map(|(name, version, local_addrs, follow)| ToTracker::Hello {
                name,
                version,
                local_addrs,
                follow,
            }),
        Just(ToTracker::Thanks),
        (any::<u32>(), arb_name()).prop_map(|(req, name)| ToTracker::Lookup { req, name }),
        Just(ToTracker::Logout),
        arb_signed_seal_key().prop_map(ToTracker::PublishSealKey),
        (any::<u32>(), arb_name()).prop_map(|(req, name)| ToTracker::SealKeyOf { req, name }),
        (arb_name(), arb_peer_id(), arb_message_id(), arb_blob()).prop_map(
            |(to, to_id, id, sealed)| ToTracker::Hold {
                to,
                to_id,
                id,
                sealed,
            }
        ),
        (arb_message_id(), arb_peer_id(), arb_blob()).prop_map(|(id, from_id, receipt)| {
            ToTracker::HeldReceived {
                id,
                from_id,
                receipt,
            }
        }),
        (arb_message_id(), arb_peer_id())
            .prop_map(|(id, from_id)| ToTracker::HeldRejected { id, from_id }),
        arb_message_id().prop_map(|id| ToTracker::NoticeSeen { id }),
        arb_name().prop_map(|to| ToTracker::Circuit { to }),
        Just(ToTracker::CircuitAccept),
        arb_name().prop_map(|to| ToTracker::Connect { to }),
        prop::collection::vec(arb_name(), 0..4).prop_map(|names| ToTracker::Subscribe { names }),
        prop::collection::vec(arb_name(), 0..4).prop_map(|names| ToTracker::Unsubscribe { names }),
        (any::<u32>(), prop::option::of(arb_name()), any::<u32>())
            .prop_map(|(req, after, limit)| ToTracker::ListPage { req, after, limit }),
    ]
}

fn arb_from_tracker() -> impl Strategy<Value = FromTracker> {
    prop_oneof![
        (arb_socket_addr(), any::<u32>()).prop_map(|(observed, max_peers)| FromTracker::Welcome {
            observed,
            max_peers
        }),
        arb_reject_reason().prop_map(|reason| FromTracker::Reject { reason }),
        (prop::collection::vec(arb_peer_info(), 0..6), any::<bool>())
            .prop_map(|(peers, last)| FromTracker::ClientList { peers, last }),
        arb_presence_change().prop_map(FromTracker::Presence),
        (any::<u32>(), prop::option::of(arb_peer_info()))
            .prop_map(|(req, peer)| FromTracker::LookupReply { req, peer }),
        Just(FromTracker::Goodbye),
        Just(FromTracker::Replaced),
        (any::<u32>(), prop::option::of(arb_seal_key_entry()))
            .prop_map(|(req, entry)| FromTracker::SealKeyReply { req, entry }),
        (arb_message_id(), arb_hold_result())
            .prop_map(|(id, result)| FromTracker::HoldReply { id, result }),
        arb_held_message().prop_map(FromTracker::Held),
        arb_notice().prop_map(FromTracker::Notice),
        (arb_name(), arb_peer_id())
            .prop_map(|(from, from_id)| FromTracker::CircuitOffer { from, from_id }),
        Just(FromTracker::CircuitReady),
        arb_circuit_refusal().prop_map(|reason| FromTracker::CircuitRefused { reason }),
        (arb_peer_info(), any::<u32>())
            .prop_map(|(peer, delay_ms)| FromTracker::Punch { peer, delay_ms }),
        any::<u32>().prop_map(|max_subscriptions| FromTracker::SubscribeMode { max_subscriptions }),
        (prop::collection::vec(arb_peer_info(), 0..6), any::<bool>())
            .prop_map(|(peers, last)| FromTracker::Subscribed { peers, last }),
        (
            any::<u32>(),
            prop::collection::vec(arb_peer_info(), 0..6),
            any::<bool>()
        )
            .prop_map(|(req, peers, more)| FromTracker::ListPageReply { req, peers, more }),
    ]
}

fn arb_to_receiver() -> impl Strategy<Value = ToReceiver> {
    prop_oneof![
        arb_name().prop_map(|from| ToReceiver::Open { from }),
        (arb_message_id(), any::<u64>(), any::<String>()).prop_map(|(id, sent_at_ms, body)| {
            ToReceiver::Msg {
                id,
                sent_at_ms,
                body,
            }
        }),
    ]
}

fn arb_to_sender() -> impl Strategy<Value = ToSender> {
    prop_oneof![
        arb_message_id().prop_map(|id| ToSender::Ack { id }),
        arb_refusal().prop_map(|reason| ToSender::Refused { reason }),
    ]
}

// ---------------------------------------------------------------------------
// 1. Round-trip properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_to_tracker_message_round_trips(msg in arb_to_tracker()) {
        prop_assert_eq!(round_trip(&msg), msg);
    }

    #[test]
    fn every_from_tracker_message_round_trips(msg in arb_from_tracker()) {
        prop_assert_eq!(round_trip(&msg), msg);
    }

    #[test]
    fn every_to_receiver_message_round_trips(msg in arb_to_receiver()) {
        prop_assert_eq!(round_trip(&msg), msg);
    }

    #[test]
    fn every_to_sender_message_round_trips(msg in arb_to_sender()) {
        prop_assert_eq!(round_trip(&msg), msg);
    }
}

#[test]
fn ipv6_flowinfo_and_scope_id_are_not_carried_on_the_wire() {
    // serde encodes a SocketAddrV6 as (ip, port) only: a link-local address
    // announced with a scope id arrives with scope id 0.
    let ip = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let scoped = SocketAddr::V6(SocketAddrV6::new(ip, 5000, 7, 3));
    let bare = SocketAddr::V6(SocketAddrV6::new(ip, 5000, 0, 0));
    assert_eq!(
        codec::encode(&scoped).unwrap(),
        codec::encode(&bare).unwrap()
    );
    assert_eq!(round_trip(&scoped), bare);
}

// ---------------------------------------------------------------------------
// 2. Golden bytes
// ---------------------------------------------------------------------------

/// A labelled value and its exact postcard encoding, as grouped hex.
type Golden<T> = (&'static str, T, &'static str);

fn peer_id_a() -> PeerId {
    PeerId(std::array::from_fn(|i| i as u8)) // 00 01 .. 1f
}

fn peer_id_b() -> PeerId {
    PeerId(std::array::from_fn(|i| 0xe0 + i as u8)) // e0 e1 .. ff
}

fn message_id() -> MessageId {
    MessageId(std::array::from_fn(|i| 0xf0 + i as u8)) // f0 f1 .. ff
}

/// 192.168.1.20:5000
fn lan_v4() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(192, 168, 1, 20), 5000))
}

/// [2001:db8::1]:443
fn lan_v6() -> SocketAddr {
    SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 443))
}

/// 203.0.113.7:40000
fn public_v4() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(203, 0, 113, 7), 40000))
}

fn alice_info() -> PeerInfo {
    PeerInfo {
        name: name("alice"),
        id: peer_id_a(),
        observed: public_v4(),
        local_addrs: vec![lan_v4()],
    }
}

/// A sealing public key: 40 41 .. 5f.
fn seal_key() -> [u8; 32] {
    std::array::from_fn(|i| 0x40 + i as u8)
}

/// Signatures, receipts and sealed messages are opaque to the wire, so the
/// goldens use short stand-ins instead of real 64-byte Ed25519 signatures.
fn signed_seal_key() -> SignedSealKey {
    SignedSealKey {
        key: seal_key(),
        sig: vec![0xa1, 0xa2, 0xa3, 0xa4],
    }
}

fn receipt() -> Vec<u8> {
    vec![0xb1, 0xb2, 0xb3]
}

fn sealed() -> Vec<u8> {
    vec![0xc1, 0xc2, 0xc3, 0xc4, 0xc5]
}

fn bob_info() -> PeerInfo {
    PeerInfo {
        name: name("Bob-2_x"),
        id: peer_id_b(),
        observed: lan_v6(),
        local_addrs: vec![],
    }
}

// Hex of the fixed ids and of `alice_info()`, shared by several goldens.
// Layout notes: `name` = varint length + UTF-8; `PeerId`/`MessageId` = raw
// bytes; `SocketAddr` = variant (00 V4 | 01 V6) + octets + varint port;
// `Vec` = varint count + items; `Option` = 00 | 01 + value; `bool` = 00 | 01.
macro_rules! peer_id_a_hex {
    () => {
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    };
}
macro_rules! peer_id_b_hex {
    () => {
        "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
    };
}
macro_rules! message_id_hex {
    () => {
        "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
    };
}
macro_rules! signed_seal_key_hex {
    () => {
        concat!(
            "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f ", // key, raw
            "04 a1a2a3a4",                                                       // sig: 4 bytes
        )
    };
}
macro_rules! alice_info_hex {
    () => {
        concat!(
            "05 616c696365",       // name "alice"
            peer_id_a_hex!(),      // id
            "00 cb007107 c0b802",  // observed V4 203.0.113.7:40000
            "01 00 c0a80114 8827", // local_addrs: [V4 192.168.1.20:5000]
        )
    };
}

fn to_tracker_goldens() -> Vec<Golden<ToTracker>> {
    vec![
        (
            "Hello",
            ToTracker::Hello {
                name: name("alice"),
                version: 1,
                local_addrs: vec![lan_v4(), lan_v6()],
                follow: Some(vec![name("bob")]),
            },
            concat!(
                "00 ",                                       // variant Hello
                "05 616c696365 ",                            // name "alice"
                "01 ",                                       // version 1
                "02 ",                                       // 2 local addrs
                "00 c0a80114 8827 ",                         // V4 192.168.1.20:5000
                "01 20010db8000000000000000000000001 bb03 ", // V6 [2001:db8::1]:443
                "01 01 03 626f62",                           // follow: Some(["bob"])
            ),
        ),
        ("Thanks", ToTracker::Thanks, "01"),
        (
            "Lookup",
            ToTracker::Lookup {
                req: 300,
                name: name("alice"),
            },
            "02 ac02 05 616c696365", // req 300 (two-byte varint), name
        ),
        ("Logout", ToTracker::Logout, "03"),
        (
            "PublishSealKey",
            ToTracker::PublishSealKey(signed_seal_key()),
            concat!("04 ", signed_seal_key_hex!()),
        ),
        (
            "SealKeyOf",
            ToTracker::SealKeyOf {
                req: 300,
                name: name("alice"),
            },
            "05 ac02 05 616c696365", // req 300, name
        ),
        (
            "Hold",
            ToTracker::Hold {
                to: name("alice"),
                to_id: peer_id_a(),
                id: message_id(),
                sealed: sealed(),
            },
            concat!(
                "06 ",            // variant Hold
                "05 616c696365 ", // to "alice"
                peer_id_a_hex!(), // to_id
                message_id_hex!(),
                " 05 c1c2c3c4c5", // sealed: 5 bytes
            ),
        ),
        (
            "HeldReceived",
            ToTracker::HeldReceived {
                id: message_id(),
                from_id: peer_id_b(),
                receipt: receipt(),
            },
            concat!(
                "07 ",
                message_id_hex!(),
                peer_id_b_hex!(), // from_id
                " 03 b1b2b3",     // receipt: 3 bytes
            ),
        ),
        (
            "HeldRejected",
            ToTracker::HeldRejected {
                id: message_id(),
                from_id: peer_id_b(),
            },
            concat!("08 ", message_id_hex!(), peer_id_b_hex!()),
        ),
        (
            "NoticeSeen",
            ToTracker::NoticeSeen { id: message_id() },
            concat!("09 ", message_id_hex!()),
        ),
        (
            "Circuit",
            ToTracker::Circuit { to: name("alice") },
            "0a 05 616c696365", // to "alice"
        ),
        ("CircuitAccept", ToTracker::CircuitAccept, "0b"),
        (
            "Connect",
            ToTracker::Connect { to: name("alice") },
            "0c 05 616c696365", // to "alice"
        ),
        (
            "Subscribe",
            ToTracker::Subscribe {
                names: vec![name("alice"), name("bob")],
            },
            "0d 02 05 616c696365 03 626f62", // names: ["alice", "bob"]
        ),
        (
            "Unsubscribe",
            ToTracker::Unsubscribe {
                names: vec![name("alice")],
            },
            "0e 01 05 616c696365", // names: ["alice"]
        ),
        (
            "ListPage",
            ToTracker::ListPage {
                req: 7,
                after: Some(name("alice")),
                limit: 256,
            },
            "0f 07 01 05 616c696365 8002", // req 7, after Some("alice"), limit 256
        ),
        (
            "ListPage(from the start)",
            ToTracker::ListPage {
                req: 8,
                after: None,
                limit: 3,
            },
            "0f 08 00 03", // req 8, after None, limit 3
        ),
    ]
}

fn from_tracker_goldens() -> Vec<Golden<FromTracker>> {
    vec![
        (
            "Welcome",
            FromTracker::Welcome {
                observed: public_v4(),
                max_peers: 1000,
            },
            "00 00 cb007107 c0b802 e807", // observed, max_peers 1000
        ),
        (
            "Reject(InvalidName)",
            FromTracker::Reject {
                reason: RejectReason::InvalidName,
            },
            "01 00",
        ),
        (
            "Reject(NameInUse)",
            FromTracker::Reject {
                reason: RejectReason::NameInUse,
            },
            "01 01",
        ),
        (
            "Reject(NameBound)",
            FromTracker::Reject {
                reason: RejectReason::NameBound,
            },
            "01 02",
        ),
        (
            "Reject(UnsupportedVersion)",
            FromTracker::Reject {
                reason: RejectReason::UnsupportedVersion,
            },
            "01 03",
        ),
        (
            "Reject(TrackerFull)",
            FromTracker::Reject {
                reason: RejectReason::TrackerFull,
            },
            "01 04",
        ),
        (
            "Reject(ProtocolViolation)",
            FromTracker::Reject {
                reason: RejectReason::ProtocolViolation,
            },
            "01 05",
        ),
        (
            "Reject(Unavailable)",
            FromTracker::Reject {
                reason: RejectReason::Unavailable,
            },
            "01 06",
        ),
        (
            "ClientList(page)",
            FromTracker::ClientList {
                peers: vec![alice_info(), bob_info()],
                last: false,
            },
            concat!(
                "02 02 ", // variant ClientList, 2 peers
                alice_info_hex!(),
                "07 426f622d325f78 ", // name "Bob-2_x"
                "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff ",
                "01 20010db8000000000000000000000001 bb03 ", // observed V6
                "00 ",                                       // no local addrs
                "00",                                        // last: false
            ),
        ),
        (
            "ClientList(last, empty)",
            FromTracker::ClientList {
                peers: vec![],
                last: true,
            },
            "02 00 01",
        ),
        (
            "Presence(Joined)",
            FromTracker::Presence(PresenceChange::Joined(alice_info())),
            concat!("03 00 ", alice_info_hex!()),
        ),
        (
            "Presence(Left)",
            FromTracker::Presence(PresenceChange::Left {
                name: name("alice"),
                id: peer_id_a(),
            }),
            concat!("03 01 05 616c696365 ", peer_id_a_hex!()),
        ),
        (
            "LookupReply(Some)",
            FromTracker::LookupReply {
                req: 300,
                peer: Some(alice_info()),
            },
            concat!("04 ac02 01 ", alice_info_hex!()),
        ),
        (
            "LookupReply(None)",
            FromTracker::LookupReply { req: 7, peer: None },
            "04 07 00",
        ),
        ("Goodbye", FromTracker::Goodbye, "05"),
        ("Replaced", FromTracker::Replaced, "06"),
        (
            "SealKeyReply(Some)",
            FromTracker::SealKeyReply {
                req: 300,
                entry: Some(SealKeyEntry {
                    name: name("alice"),
                    id: peer_id_a(),
                    seal: signed_seal_key(),
                }),
            },
            concat!(
                "07 ac02 01 ",    // variant SealKeyReply, req 300, Some
                "05 616c696365 ", // name "alice"
                peer_id_a_hex!(), // id
                " ",
                signed_seal_key_hex!(), // seal
            ),
        ),
        (
            "SealKeyReply(None)",
            FromTracker::SealKeyReply {
                req: 7,
                entry: None,
            },
            "07 07 00",
        ),
        (
            "HoldReply(Held)",
            FromTracker::HoldReply {
                id: message_id(),
                result: HoldResult::Held {
                    expires_at: 1_700_000_000,
                },
            },
            concat!("08 ", message_id_hex!(), " 00 80e2cfaa06"), // expires_at, five-byte varint
        ),
        (
            "HoldReply(UnknownName)",
            FromTracker::HoldReply {
                id: message_id(),
                result: HoldResult::UnknownName,
            },
            concat!("08 ", message_id_hex!(), " 01"),
        ),
        (
            "HoldReply(KeyMismatch)",
            FromTracker::HoldReply {
                id: message_id(),
                result: HoldResult::KeyMismatch,
            },
            concat!("08 ", message_id_hex!(), " 02"),
        ),
        (
            "HoldReply(MailboxFull)",
            FromTracker::HoldReply {
                id: message_id(),
                result: HoldResult::MailboxFull,
            },
            concat!("08 ", message_id_hex!(), " 03"),
        ),
        (
            "HoldReply(TooLarge)",
            FromTracker::HoldReply {
                id: message_id(),
                result: HoldResult::TooLarge,
            },
            concat!("08 ", message_id_hex!(), " 04"),
        ),
        (
            "HoldReply(Unavailable)",
            FromTracker::HoldReply {
                id: message_id(),
                result: HoldResult::Unavailable,
            },
            concat!("08 ", message_id_hex!(), " 05"),
        ),
        (
            "Held",
            FromTracker::Held(HeldMessage {
                from: name("alice"),
                from_id: peer_id_a(),
                id: message_id(),
                stored_at: 1_699_990_000,
                sealed: sealed(),
            }),
            concat!(
                "09 ",            // variant Held
                "05 616c696365 ", // from "alice"
                peer_id_a_hex!(), // from_id
                message_id_hex!(),
                " f093cfaa06",    // stored_at, five-byte varint
                " 05 c1c2c3c4c5", // sealed: 5 bytes
            ),
        ),
        (
            "Notice(Delivered)",
            FromTracker::Notice(Notice {
                id: message_id(),
                to: name("alice"),
                kind: NoticeKind::Delivered {
                    by: peer_id_b(),
                    receipt: receipt(),
                },
            }),
            concat!(
                "0a ",
                message_id_hex!(),
                " 05 616c696365 ", // to "alice"
                "00 ",             // kind Delivered
                peer_id_b_hex!(),  // by
                " 03 b1b2b3",      // receipt: 3 bytes
            ),
        ),
        (
            "Notice(Expired)",
            FromTracker::Notice(Notice {
                id: message_id(),
                to: name("alice"),
                kind: NoticeKind::Expired,
            }),
            concat!("0a ", message_id_hex!(), " 05 616c696365 01"),
        ),
        (
            "Notice(Rejected)",
            FromTracker::Notice(Notice {
                id: message_id(),
                to: name("alice"),
                kind: NoticeKind::Rejected,
            }),
            concat!("0a ", message_id_hex!(), " 05 616c696365 02"),
        ),
        (
            "CircuitOffer",
            FromTracker::CircuitOffer {
                from: name("alice"),
                from_id: peer_id_a(),
            },
            concat!("0b 05 616c696365 ", peer_id_a_hex!()), // from "alice", from_id
        ),
        ("CircuitReady", FromTracker::CircuitReady, "0c"),
        (
            "CircuitRefused(NotOnline)",
            FromTracker::CircuitRefused {
                reason: CircuitRefusal::NotOnline,
            },
            "0d 00",
        ),
        (
            "CircuitRefused(NotEnrolled)",
            FromTracker::CircuitRefused {
                reason: CircuitRefusal::NotEnrolled,
            },
            "0d 01",
        ),
        (
            "CircuitRefused(TooManyCircuits)",
            FromTracker::CircuitRefused {
                reason: CircuitRefusal::TooManyCircuits,
            },
            "0d 02",
        ),
        (
            "CircuitRefused(TrackerBusy)",
            FromTracker::CircuitRefused {
                reason: CircuitRefusal::TrackerBusy,
            },
            "0d 03",
        ),
        (
            "CircuitRefused(Declined)",
            FromTracker::CircuitRefused {
                reason: CircuitRefusal::Declined,
            },
            "0d 04",
        ),
        (
            "CircuitRefused(Throttled)",
            FromTracker::CircuitRefused {
                reason: CircuitRefusal::Throttled,
            },
            "0d 05",
        ),
        (
            "Punch",
            FromTracker::Punch {
                peer: alice_info(),
                delay_ms: 250,
            },
            concat!("0e ", alice_info_hex!(), " fa01"), // peer, delay_ms 250 (two-byte varint)
        ),
        (
            "SubscribeMode",
            FromTracker::SubscribeMode {
                max_subscriptions: 1024,
            },
            "0f 8008", // max_subscriptions 1024 (two-byte varint)
        ),
        (
            "Subscribed",
            FromTracker::Subscribed {
                peers: vec![alice_info()],
                last: true,
            },
            concat!("10 01 ", alice_info_hex!(), " 01"), // peers: [alice], last
        ),
        (
            "ListPageReply",
            FromTracker::ListPageReply {
                req: 7,
                peers: vec![alice_info()],
                more: false,
            },
            concat!("11 07 01 ", alice_info_hex!(), " 00"), // req 7, peers: [alice], no more
        ),
    ]
}

fn to_receiver_goldens() -> Vec<Golden<ToReceiver>> {
    vec![
        (
            "Open",
            ToReceiver::Open {
                from: name("alice"),
            },
            "00 05 616c696365",
        ),
        (
            "Msg",
            ToReceiver::Msg {
                id: message_id(),
                sent_at_ms: 1_700_000_000_000,
                body: "hi ☃".to_owned(),
            },
            concat!(
                "01 ",
                message_id_hex!(),
                " 80d095ffbc31",    // sent_at_ms, six-byte varint
                " 06 686920e29883", // body: 6 UTF-8 bytes
            ),
        ),
    ]
}

fn to_sender_goldens() -> Vec<Golden<ToSender>> {
    vec![
        (
            "Ack",
            ToSender::Ack { id: message_id() },
            concat!("00 ", message_id_hex!()),
        ),
        (
            "Refused(UnknownSender)",
            ToSender::Refused {
                reason: Refusal::UnknownSender,
            },
            "01 00",
        ),
        (
            "Refused(TooLarge)",
            ToSender::Refused {
                reason: Refusal::TooLarge,
            },
            "01 01",
        ),
    ]
}

/// Postcard variant index of each message, by exhaustive match: a new variant
/// stops this file compiling until it is given an index here (and the count
/// below is bumped, which `goldens_cover_every_variant_at_its_index` then
/// enforces with a golden).
fn to_tracker_index(m: &ToTracker) -> u8 {
    match m {
        ToTracker::Hello { .. } => 0,
        ToTracker::Thanks => 1,
        ToTracker::Lookup { .. } => 2,
        ToTracker::Logout => 3,
        ToTracker::PublishSealKey(_) => 4,
        ToTracker::SealKeyOf { .. } => 5,
        ToTracker::Hold { .. } => 6,
        ToTracker::HeldReceived { .. } => 7,
        ToTracker::HeldRejected { .. } => 8,
        ToTracker::NoticeSeen { .. } => 9,
        ToTracker::Circuit { .. } => 10,
        ToTracker::CircuitAccept => 11,
        ToTracker::Connect { .. } => 12,
        ToTracker::Subscribe { .. } => 13,
        ToTracker::Unsubscribe { .. } => 14,
        ToTracker::ListPage { .. } => 15,
    }
}
const TO_TRACKER_VARIANTS: u8 = 16;

fn from_tracker_index(m: &FromTracker) -> u8 {
    match m {
        FromTracker::Welcome { .. } => 0,
        FromTracker::Reject { .. } => 1,
        FromTracker::ClientList { .. } => 2,
        FromTracker::Presence(_) => 3,
        FromTracker::LookupReply { .. } => 4,
        FromTracker::Goodbye => 5,
        FromTracker::Replaced => 6,
        FromTracker::SealKeyReply { .. } => 7,
        FromTracker::HoldReply { .. } => 8,
        FromTracker::Held(_) => 9,
        FromTracker::Notice(_) => 10,
        FromTracker::CircuitOffer { .. } => 11,
        FromTracker::CircuitReady => 12,
        FromTracker::CircuitRefused { .. } => 13,
        FromTracker::Punch { .. } => 14,
        FromTracker::SubscribeMode { .. } => 15,
        FromTracker::Subscribed { .. } => 16,
        FromTracker::ListPageReply { .. } => 17,
    }
}
const FROM_TRACKER_VARIANTS: u8 = 18;

fn to_receiver_index(m: &ToReceiver) -> u8 {
    match m {
        ToReceiver::Open { .. } => 0,
        ToReceiver::Msg { .. } => 1,
    }
}
const TO_RECEIVER_VARIANTS: u8 = 2;

fn to_sender_index(m: &ToSender) -> u8 {
    match m {
        ToSender::Ack { .. } => 0,
        ToSender::Refused { .. } => 1,
    }
}
const TO_SENDER_VARIANTS: u8 = 2;

/// Every golden encodes to exactly its literal, and the literal decodes back.
fn assert_goldens<T>(goldens: &[Golden<T>])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    for (label, value, hex) in goldens {
        let want = unhex(hex);
        let got = codec::encode(value).unwrap();
        assert_eq!(
            hex::encode(&got),
            hex::encode(&want),
            "{label}: the encoding changed"
        );
        assert_eq!(
            &codec::decode::<T>(&want).unwrap(),
            value,
            "{label}: the golden bytes decode differently"
        );
    }
}

fn assert_covers_every_variant<T>(goldens: &[Golden<T>], index: fn(&T) -> u8, variants: u8) {
    let mut seen = BTreeSet::new();
    for (label, value, hex) in goldens {
        let i = index(value);
        assert_eq!(
            unhex(hex)[0],
            i,
            "{label}: first byte is not the variant index"
        );
        seen.insert(i);
    }
    let all: BTreeSet<u8> = (0..variants).collect();
    assert_eq!(seen, all, "some variant has no golden");
}

#[test]
fn to_tracker_encodings_match_golden_bytes() {
    assert_goldens(&to_tracker_goldens());
}

#[test]
fn from_tracker_encodings_match_golden_bytes() {
    assert_goldens(&from_tracker_goldens());
}

#[test]
fn to_receiver_encodings_match_golden_bytes() {
    assert_goldens(&to_receiver_goldens());
}

#[test]
fn to_sender_encodings_match_golden_bytes() {
    assert_goldens(&to_sender_goldens());
}

#[test]
fn goldens_cover_every_variant_at_its_index() {
    assert_covers_every_variant(&to_tracker_goldens(), to_tracker_index, TO_TRACKER_VARIANTS);
    assert_covers_every_variant(
        &from_tracker_goldens(),
        from_tracker_index,
        FROM_TRACKER_VARIANTS,
    );
    assert_covers_every_variant(
        &to_receiver_goldens(),
        to_receiver_index,
        TO_RECEIVER_VARIANTS,
    );
    assert_covers_every_variant(&to_sender_goldens(), to_sender_index, TO_SENDER_VARIANTS);
}

// ---------------------------------------------------------------------------
// 3. Malformed input
// ---------------------------------------------------------------------------

fn assert_every_truncation_fails<T: DeserializeOwned + Debug>(goldens: &[Golden<T>]) {
    for (label, _, hex) in goldens {
        let bytes = unhex(hex);
        for len in 0..bytes.len() {
            let res = codec::decode::<T>(&bytes[..len]);
            assert!(
                matches!(res, Err(FrameError::Malformed(_))),
                "{label} cut to {len} of {} bytes: {res:?}",
                bytes.len()
            );
        }
    }
}

#[test]
fn every_strict_prefix_of_every_golden_encoding_is_an_error() {
    assert_every_truncation_fails(&to_tracker_goldens());
    assert_every_truncation_fails(&from_tracker_goldens());
    assert_every_truncation_fails(&to_receiver_goldens());
    assert_every_truncation_fails(&to_sender_goldens());
}

/// Flips the given bits of `value`'s encoding and decodes the result, which
/// must not panic. If it decodes at all, the value must itself round-trip.
fn decode_with_flipped_bits<T>(value: &T, flips: &[(Index, u8)]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut bytes = codec::encode(value).unwrap().to_vec();
    for (at, bit) in flips {
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
    }
    if let Ok(decoded) = codec::decode::<T>(&bytes) {
        prop_assert_eq!(&round_trip(&decoded), &decoded);
    }
    Ok(())
}

/// A valid encoding followed by one more byte is refused as trailing data.
fn decode_with_trailing_byte<T>(value: &T, extra: u8) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + Debug,
{
    let mut bytes = codec::encode(value).unwrap().to_vec();
    bytes.push(extra);
    let res = codec::decode::<T>(&bytes);
    prop_assert!(matches!(res, Err(FrameError::Trailing(1))), "{:?}", res);
    Ok(())
}

fn arb_flips() -> impl Strategy<Value = Vec<(Index, u8)>> {
    prop::collection::vec((any::<Index>(), 0u8..8), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn bit_flips_in_to_tracker_encodings_never_panic(msg in arb_to_tracker(), flips in arb_flips()) {
        decode_with_flipped_bits(&msg, &flips)?;
    }

    #[test]
    fn bit_flips_in_from_tracker_encodings_never_panic(msg in arb_from_tracker(), flips in arb_flips()) {
        decode_with_flipped_bits(&msg, &flips)?;
    }

    #[test]
    fn bit_flips_in_to_receiver_encodings_never_panic(msg in arb_to_receiver(), flips in arb_flips()) {
        decode_with_flipped_bits(&msg, &flips)?;
    }

    #[test]
    fn bit_flips_in_to_sender_encodings_never_panic(msg in arb_to_sender(), flips in arb_flips()) {
        decode_with_flipped_bits(&msg, &flips)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = codec::decode::<ToTracker>(&bytes);
        let _ = codec::decode::<FromTracker>(&bytes);
        let _ = codec::decode::<ToReceiver>(&bytes);
        let _ = codec::decode::<ToSender>(&bytes);
    }

    #[test]
    fn a_trailing_byte_after_any_valid_message_is_a_trailing_error(
        up in arb_to_tracker(),
        down in arb_from_tracker(),
        msg in arb_to_receiver(),
        ack in arb_to_sender(),
        extra in any::<u8>(),
    ) {
        decode_with_trailing_byte(&up, extra)?;
        decode_with_trailing_byte(&down, extra)?;
        decode_with_trailing_byte(&msg, extra)?;
        decode_with_trailing_byte(&ack, extra)?;
    }
}

/// Names that must not decode, each with a one-byte length varint.
fn invalid_names() -> Vec<Vec<u8>> {
    vec![
        b"".to_vec(),              // empty
        b"al ice".to_vec(),        // space
        "z".repeat(33).into(),     // 33 characters
        b"a/b".to_vec(),           // punctuation
        b"alice\n".to_vec(),       // control character
        "bøb".as_bytes().to_vec(), // valid UTF-8, not ASCII
        b"\xff\xfe".to_vec(),      // not UTF-8
        b"a\0b".to_vec(),          // NUL
    ]
}

/// A `Hello` built by hand: variant 0, name, version 1, no local addresses,
/// no names to follow.
fn hello_bytes(name: &[u8]) -> Vec<u8> {
    let len = u8::try_from(name.len()).unwrap();
    assert!(len < 0x80, "one-byte varint only");
    let mut bytes = vec![0x00, len];
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(&[0x01, 0x00, 0x00]);
    bytes
}

#[test]
fn hello_with_an_invalid_name_is_rejected() {
    // Control: the hand-built encoding is right, so the failures below are
    // about the name and nothing else.
    for ok in ["alice", "A_b-9", &"z".repeat(32)] {
        assert_eq!(
            codec::decode::<ToTracker>(&hello_bytes(ok.as_bytes())).unwrap(),
            ToTracker::Hello {
                name: name(ok),
                version: 1,
                local_addrs: vec![],
                follow: None,
            }
        );
    }
    for name in &invalid_names() {
        let res = codec::decode::<ToTracker>(&hello_bytes(name));
        assert!(
            matches!(res, Err(FrameError::Malformed(_))),
            "{:?} decoded as {res:?}",
            String::from_utf8_lossy(name)
        );
    }
}

/// `variant`, then `name` (one-byte length varint), then `rest`.
fn name_first_bytes(variant: u8, name: &[u8], rest: &[u8]) -> Vec<u8> {
    let len = u8::try_from(name.len()).unwrap();
    assert!(len < 0x80, "one-byte varint only");
    let mut bytes = vec![variant, len];
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(rest);
    bytes
}

#[test]
fn circuit_connect_and_circuit_offer_with_an_invalid_name_are_rejected() {
    fn check<T: DeserializeOwned + PartialEq + Debug>(variant: u8, rest: &[u8], ok: fn(Name) -> T) {
        // Control: the hand-built encoding is right.
        for good in ["alice", "A_b-9", &"z".repeat(32)] {
            let bytes = name_first_bytes(variant, good.as_bytes(), rest);
            assert_eq!(codec::decode::<T>(&bytes).unwrap(), ok(name(good)));
        }
        for bad in &invalid_names() {
            let res = codec::decode::<T>(&name_first_bytes(variant, bad, rest));
            assert!(
                matches!(res, Err(FrameError::Malformed(_))),
                "variant {variant}: {:?} decoded as {res:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
    check(10, &[], |to| ToTracker::Circuit { to });
    check(12, &[], |to| ToTracker::Connect { to });
    check(11, &peer_id_a().0, |from| FromTracker::CircuitOffer {
        from,
        from_id: peer_id_a(),
    });
}

/// Replaces the first `alice` in the encoding with `al ce` (same length) and
/// asserts the result no longer decodes.
fn assert_spaced_name_rejected<T: DeserializeOwned + Debug>(goldens: &[Golden<T>]) -> usize {
    let mut checked = 0;
    for (label, _, hex) in goldens {
        let mut bytes = unhex(hex);
        let Some(at) = bytes.windows(5).position(|w| w == b"alice") else {
            continue;
        };
        bytes[at + 2] = b' ';
        let res = codec::decode::<T>(&bytes);
        assert!(
            matches!(res, Err(FrameError::Malformed(_))),
            "{label} with name \"al ce\": {res:?}"
        );
        checked += 1;
    }
    checked
}

#[test]
fn an_invalid_name_in_any_message_that_carries_one_is_rejected() {
    // Hello, Lookup, SealKeyOf, Hold, Circuit, Connect, Subscribe,
    // Unsubscribe, ListPage(Some);
    // ClientList, Presence(Joined/Left), LookupReply(Some), SealKeyReply(Some),
    // Held, Notice(Delivered/Expired/Rejected), CircuitOffer, Punch,
    // Subscribed, ListPageReply;
    // Open.
    assert_eq!(assert_spaced_name_rejected(&to_tracker_goldens()), 9);
    assert_eq!(assert_spaced_name_rejected(&from_tracker_goldens()), 13);
    assert_eq!(assert_spaced_name_rejected(&to_receiver_goldens()), 1);
}

#[test]
fn unknown_variant_indices_and_invalid_tags_are_rejected() {
    fn bad<T: DeserializeOwned + Debug>(hex: &str) {
        let res = codec::decode::<T>(&unhex(hex));
        assert!(
            matches!(res, Err(FrameError::Malformed(_))),
            "{hex} decoded as {res:?}"
        );
    }
    bad::<ToTracker>("10"); // one past ListPage
    bad::<ToTracker>("0f 07 02"); // ListPage.after: Option tag 2
    bad::<ToTracker>("7f");
    bad::<ToTracker>("8001"); // varint 128
    bad::<ToTracker>("02 ffffffffff01 01 61"); // Lookup.req overflows u32
    bad::<ToTracker>("05 ffffffffff01 01 61"); // SealKeyOf.req overflows u32
    bad::<FromTracker>("12"); // one past ListPageReply
    bad::<FromTracker>("10 00 02"); // Subscribed.last is neither 0 nor 1
    bad::<FromTracker>("11 07 00 02"); // ListPageReply.more is neither 0 nor 1
    bad::<FromTracker>("00 02 cb007107 c0b802 e807"); // SocketAddr tag 2
    bad::<FromTracker>("01 07"); // RejectReason one past Unavailable
    bad::<FromTracker>("02 00 02"); // ClientList.last is neither 0 nor 1
    bad::<FromTracker>("03 02"); // PresenceChange one past Left
    bad::<FromTracker>("04 07 02"); // Option tag 2
    bad::<FromTracker>("07 07 02"); // SealKeyReply.entry: Option tag 2
    bad::<FromTracker>(concat!("08 ", message_id_hex!(), " 06")); // HoldResult one past Unavailable
    // HoldResult::Held.expires_at overflows u64
    bad::<FromTracker>(concat!(
        "08 ",
        message_id_hex!(),
        " 00 ffffffffffffffffff02"
    ));
    bad::<FromTracker>(concat!("0a ", message_id_hex!(), " 05 616c696365 03")); // NoticeKind one past Rejected
    bad::<FromTracker>("0d 06"); // CircuitRefusal one past Throttled
    bad::<FromTracker>(concat!("0e ", alice_info_hex!(), " ffffffffff01")); // Punch.delay_ms overflows u32
    bad::<ToReceiver>("02"); // one past Msg
    bad::<ToReceiver>(concat!("01 ", message_id_hex!(), " 00 02 fffe")); // body not UTF-8
    bad::<ToSender>("02"); // one past Refused
    bad::<ToSender>("01 02"); // Refusal one past TooLarge
}

// ---------------------------------------------------------------------------
// 4. Framing through the typed Codec
// ---------------------------------------------------------------------------

/// Sends `value` from a `Codec<Back, T>` to a `Codec<T, Back>` (the two ends
/// of one stream) and checks the frame layout on the way.
fn frame_round_trip<T, Back>(value: T) -> T
where
    T: Serialize + DeserializeOwned + Clone,
{
    let mut sender = Codec::<Back, T>::default();
    let mut receiver = Codec::<T, Back>::default();
    let mut buf = BytesMut::new();
    sender.encode(value.clone(), &mut buf).unwrap();

    let body = codec::encode(&value).unwrap();
    let len = u32::try_from(body.len()).unwrap();
    assert_eq!(
        &buf[..4],
        &len.to_be_bytes(),
        "4-byte big-endian length prefix"
    );
    assert_eq!(&buf[4..], &body[..], "postcard body");

    let decoded = receiver.decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty(), "the whole frame was consumed");
    decoded
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn codec_frames_round_trip_on_both_protocols_in_both_directions(
        up in arb_to_tracker(),
        down in arb_from_tracker(),
        msg in arb_to_receiver(),
        ack in arb_to_sender(),
    ) {
        prop_assert_eq!(frame_round_trip::<_, FromTracker>(up.clone()), up);
        prop_assert_eq!(frame_round_trip::<_, ToTracker>(down.clone()), down);
        prop_assert_eq!(frame_round_trip::<_, ToSender>(msg.clone()), msg);
        prop_assert_eq!(frame_round_trip::<_, ToReceiver>(ack.clone()), ack);
    }
}

#[test]
fn frame_is_a_four_byte_big_endian_length_then_the_postcard_body() {
    let mut peer = Codec::<FromTracker, ToTracker>::default();
    let mut buf = BytesMut::new();
    peer.encode(ToTracker::Thanks, &mut buf).unwrap();
    peer.encode(
        ToTracker::Lookup {
            req: 300,
            name: name("alice"),
        },
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        hex::encode(&buf),
        hex::encode(unhex("00000001 01  00000009 02 ac02 05 616c696365"))
    );
}

#[test]
fn a_value_over_max_frame_len_is_refused_and_leaves_the_buffer_as_it_was() {
    let mut sender = Codec::<ToSender, ToReceiver>::default();
    let mut buf = BytesMut::new();
    let open = ToReceiver::Open {
        from: name("alice"),
    };
    sender.encode(open.clone(), &mut buf).unwrap();
    let before = buf.clone();
    let huge = ToReceiver::Msg {
        id: MessageId([1; 16]),
        sent_at_ms: 1,
        body: "x".repeat(MAX_FRAME_LEN),
    };
    match sender.encode(huge, &mut buf) {
        Err(FrameError::TooLarge(len)) => assert!(len > MAX_FRAME_LEN, "{len}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(buf, before, "the frames before it are intact");
    let mut receiver = Codec::<ToReceiver, ToSender>::default();
    assert_eq!(receiver.decode(&mut buf).unwrap(), Some(open));
    assert!(buf.is_empty());
}

#[test]
fn length_prefix_over_max_frame_len_is_an_error_without_allocating_the_frame() {
    let over = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
    for len in [over, 1 << 30, u32::MAX] {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&[0x01; 16]);
        let res = Codec::<ToTracker, FromTracker>::default().decode(&mut buf);
        match res {
            Err(FrameError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
            other => panic!("length {len}: expected an I/O error, got {other:?}"),
        }
        assert!(
            buf.capacity() < MAX_FRAME_LEN,
            "length {len}: buffer grew to {}",
            buf.capacity()
        );
    }
}

#[test]
fn length_prefix_of_exactly_max_frame_len_is_accepted_and_waits_for_the_body() {
    let max = u32::try_from(MAX_FRAME_LEN).unwrap();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&max.to_be_bytes());
    buf.extend_from_slice(&[0x01; 16]);
    let res = Codec::<ToTracker, FromTracker>::default().decode(&mut buf);
    assert!(matches!(res, Ok(None)), "{res:?}");
}

#[test]
fn a_partial_frame_decodes_to_none_until_its_last_byte_arrives() {
    let hello = to_tracker_goldens().swap_remove(0).1;
    let mut frame = BytesMut::new();
    Codec::<FromTracker, ToTracker>::default()
        .encode(hello.clone(), &mut frame)
        .unwrap();

    let mut tracker = Codec::<ToTracker, FromTracker>::default();
    let mut buf = BytesMut::new();
    let (last, rest) = frame.split_last().unwrap();
    for &byte in rest {
        buf.extend_from_slice(&[byte]);
        assert!(matches!(tracker.decode(&mut buf), Ok(None)));
    }
    buf.extend_from_slice(&[*last]);
    assert_eq!(tracker.decode(&mut buf).unwrap(), Some(hello));
    assert!(buf.is_empty());
    assert!(matches!(tracker.decode(&mut buf), Ok(None)));
}

#[test]
fn two_frames_back_to_back_decode_as_two_items_in_order() {
    let open = ToReceiver::Open {
        from: name("alice"),
    };
    let msg = to_receiver_goldens().swap_remove(1).1;
    let mut sender = Codec::<ToSender, ToReceiver>::default();
    let mut buf = BytesMut::new();
    sender.encode(open.clone(), &mut buf).unwrap();
    sender.encode(msg.clone(), &mut buf).unwrap();

    let mut receiver = Codec::<ToReceiver, ToSender>::default();
    assert_eq!(receiver.decode(&mut buf).unwrap(), Some(open));
    assert_eq!(receiver.decode(&mut buf).unwrap(), Some(msg));
    assert_eq!(receiver.decode(&mut buf).unwrap(), None);
    assert!(buf.is_empty());
}

#[test]
fn pre_encoded_frames_are_byte_identical_to_direct_encoding_and_decode_the_same() {
    let change = FromTracker::Presence(PresenceChange::Joined(alice_info()));
    let mut tracker = Codec::<ToTracker, FromTracker>::default();

    let mut direct = BytesMut::new();
    tracker.encode(change.clone(), &mut direct).unwrap();

    // Encoded once, written to three recipients (the tracker's fan-out).
    let pre = Encoded::new(&change).unwrap();
    assert_eq!(pre.len(), codec::encode(&change).unwrap().len());
    assert!(!pre.is_empty());
    let mut fan_out = BytesMut::new();
    for _ in 0..3 {
        tracker.encode(pre.clone(), &mut fan_out).unwrap();
    }
    assert_eq!(&fan_out[..], &direct.repeat(3)[..]);

    let mut peer = Codec::<FromTracker, ToTracker>::default();
    for _ in 0..3 {
        assert_eq!(peer.decode(&mut fan_out).unwrap(), Some(change.clone()));
    }
    assert!(fan_out.is_empty());
}

/// A `Msg` whose encoding is `MAX_FRAME_LEN + over` bytes: variant (1) + id
/// (16) + `sent_at_ms` 0 (1) + three-byte body length varint + body.
fn msg_encoding_to(over: usize) -> ToReceiver {
    ToReceiver::Msg {
        id: message_id(),
        sent_at_ms: 0,
        body: "x".repeat(MAX_FRAME_LEN - 21 + over),
    }
}

#[test]
fn a_value_of_exactly_max_frame_len_encodes_and_frames() {
    let msg = msg_encoding_to(0);
    assert_eq!(codec::encode(&msg).unwrap().len(), MAX_FRAME_LEN);
    assert_eq!(frame_round_trip::<_, ToSender>(msg.clone()), msg);
}

#[test]
fn encoding_a_value_past_max_frame_len_is_too_large_and_writes_nothing() {
    for over in [1, MAX_FRAME_LEN] {
        let msg = msg_encoding_to(over);
        let n = match codec::encode(&msg) {
            Err(FrameError::TooLarge(n)) => n,
            other => panic!("expected TooLarge, got {other:?}"),
        };
        assert!(n > MAX_FRAME_LEN);
        if over == 1 {
            assert_eq!(n, MAX_FRAME_LEN + 1);
        }
        assert!(matches!(Encoded::new(&msg), Err(FrameError::TooLarge(_))));

        let mut dst = BytesMut::new();
        let res = Codec::<ToSender, ToReceiver>::default().encode(msg, &mut dst);
        assert!(matches!(res, Err(FrameError::TooLarge(_))), "{res:?}");
        assert!(dst.is_empty(), "nothing was written for a refused frame");
    }
}

#[test]
fn a_well_framed_but_malformed_body_is_an_error() {
    let mut tracker = Codec::<ToTracker, FromTracker>::default();
    for (hex, what) in [
        ("00000000", "empty body"),
        ("00000001 ff", "unknown variant"),
        ("00000002 05 61", "truncated Hello"),
    ] {
        let mut buf = BytesMut::from(&unhex(hex)[..]);
        let res = tracker.decode(&mut buf);
        assert!(
            matches!(res, Err(FrameError::Malformed(_))),
            "{what}: {res:?}"
        );
    }
    let mut buf = BytesMut::from(&unhex("00000002 01 00")[..]); // Thanks + 1 byte
    let res = tracker.decode(&mut buf);
    assert!(matches!(res, Err(FrameError::Trailing(1))), "{res:?}");
}

/// The largest entry a tracker can hand out: a 32-character name, an IPv6
/// observed address and the most local addresses, all with 3-byte ports.
fn largest_peer_info(i: usize) -> PeerInfo {
    let v6 = |n: u16| SocketAddr::new(Ipv6Addr::new(0xfd00, n, 0, 0, 0, 0, 0, 1).into(), 65535);
    PeerInfo {
        name: name(&format!("{i:032}")),
        id: peer_id_a(),
        observed: v6(0),
        local_addrs: (1..=MAX_LOCAL_ADDRS as u16).map(v6).collect(),
    }
}

#[test]
fn a_full_page_of_the_largest_entries_fits_a_frame_in_every_paged_reply() {
    let peers: Vec<PeerInfo> = (0..LIST_PAGE).map(largest_peer_info).collect();
    for frame in [
        FromTracker::ClientList {
            peers: peers.clone(),
            last: false,
        },
        FromTracker::Subscribed {
            peers: peers.clone(),
            last: false,
        },
        FromTracker::ListPageReply {
            req: u32::MAX,
            peers,
            more: true,
        },
    ] {
        let len = codec::encode(&frame).unwrap().len();
        assert!(len <= MAX_FRAME_LEN, "{len} bytes");
    }
}

#[test]
fn the_largest_hello_fits_a_frame() {
    // A 32-character name, the most local addresses, and as many
    // 32-character names to follow as a peer sends and a tracker takes
    // (the peer's MAX_FOLLOWED, the tracker's MAX_SUBSCRIPTIONS: 1 024).
    let largest = largest_peer_info(0);
    let hello = ToTracker::Hello {
        name: largest.name,
        version: u16::MAX,
        local_addrs: largest.local_addrs,
        follow: Some((0..1_024).map(|i| name(&format!("{i:032}"))).collect()),
    };
    let len = codec::encode(&hello).unwrap().len();
    assert!(len <= MAX_FRAME_LEN, "{len} bytes");
}
