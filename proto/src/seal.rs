//! Sealed messages for peers that are offline: only the recipient can read
//! them, only the claimed sender can have written them, and the tracker that
//! stores them can do neither.
//!
//! - Each peer has an X25519 sealing key ([`SealKeys`]) next to its Ed25519
//!   identity, and publishes it signed by that identity ([`sign_seal_key`]).
//!   A sender checks the signature against the identity key it has pinned
//!   for the name ([`verify_seal_key`]) before sealing to it.
//! - [`seal`] is HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256),
//!   HKDF-SHA256, ChaCha20-Poly1305, with the recipient's identity in the
//!   `info` string. Inside is a [`Letter`] carrying the sender's Ed25519
//!   signature over (recipient, id, time, body), so the tracker cannot forge
//!   a sender: sealing to a public key is something anyone can do.
//! - The recipient acknowledges with a signed receipt ([`sign_receipt`]) so
//!   that the tracker cannot claim a delivery that did not happen.

use std::{fs, io::Write, path::Path};

use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rcgen::SigningKey;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::{MessageId, Name, PeerId, tls::Identity, tracker::SignedSealKey};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Bytes of the encapsulated key at the front of a sealed message.
const ENCAPPED_LEN: usize = 32;
/// Largest sealed message: a maximal body plus names, ids, signature and tag.
pub const MAX_SEALED_LEN: usize = crate::MAX_BODY_LEN + 1024;

const SEAL_KEY_CONTEXT: &[u8] = b"tincan seal key v1";
const LETTER_CONTEXT: &[u8] = b"tincan letter v1";
const RECEIPT_CONTEXT: &[u8] = b"tincan receipt v1";
const INFO_CONTEXT: &[u8] = b"tincan held message v1";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read sealing key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("signing failed")]
    Sign,
    #[error("the recipient's sealing key is not valid")]
    BadRecipientKey,
    #[error("encryption failed")]
    Encrypt,
    #[error("the sealed message does not open with this peer's key (tampered, or not for us)")]
    Open,
    #[error("the sealed message is malformed")]
    Malformed,
    #[error("the sender's signature does not verify")]
    BadSignature,
    #[error("sealed message too large")]
    TooLarge,
}

/// A peer's X25519 sealing key pair.
pub struct SealKeys {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl SealKeys {
    pub fn generate() -> Self {
        let (secret, public) = Kem::gen_keypair();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&public.to_bytes());
        Self {
            secret,
            public: bytes,
        }
    }

    /// Loads the raw 32-byte secret at `path`, or creates it (mode 0600).
    /// A file that exists but is not a key is an error, never replaced.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let shown = path.display().to_string();
        let key_err = |reason: String| SealError::Key {
            path: shown.clone(),
            reason,
        };
        match fs::read(path) {
            Ok(bytes) => {
                let secret = <Kem as hpke::Kem>::PrivateKey::from_bytes(&bytes)
                    .map_err(|_| key_err("not a 32-byte X25519 secret".into()))?;
                let public = Kem::sk_to_pk(&secret);
                let mut bytes = [0u8; 32];
                bytes.copy_from_slice(&public.to_bytes());
                Ok(Self {
                    secret,
                    public: bytes,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = Self::generate();
                let write = || -> std::io::Result<()> {
                    let mut opts = fs::OpenOptions::new();
                    opts.write(true).create_new(true);
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::OpenOptionsExt;
                        opts.mode(0o600);
                    }
                    let mut file = opts.open(path)?;
                    file.write_all(&keys.secret.to_bytes())?;
                    file.sync_all()
                };
                write().map_err(|e| key_err(e.to_string()))?;
                Ok(keys)
            }
            Err(e) => Err(key_err(e.to_string())),
        }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }
}

fn ed25519_verify(signer: PeerId, msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, signer.0)
        .verify(msg, sig)
        .is_ok()
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The identity's signature over its sealing key.
pub fn sign_seal_key(identity: &Identity, keys: &SealKeys) -> Result<SignedSealKey, SealError> {
    let sig = identity
        .key_pair()
        .sign(&concat(&[SEAL_KEY_CONTEXT, &keys.public]))
        .map_err(|_| SealError::Sign)?;
    Ok(SignedSealKey {
        key: keys.public,
        sig,
    })
}

/// Whether `signed` was signed by `owner`.
pub fn verify_seal_key(owner: PeerId, signed: &SignedSealKey) -> bool {
    ed25519_verify(
        owner,
        &concat(&[SEAL_KEY_CONTEXT, &signed.key]),
        &signed.sig,
    )
}

/// What is inside a sealed message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Letter {
    pub from: Name,
    pub from_id: PeerId,
    pub id: MessageId,
    pub sent_at_ms: u64,
    pub body: String,
    /// `from_id`'s signature over (recipient, id, sent_at_ms, body).
    pub sig: Vec<u8>,
}

fn letter_signed_bytes(recipient: PeerId, id: MessageId, sent_at_ms: u64, body: &str) -> Vec<u8> {
    concat(&[
        LETTER_CONTEXT,
        &recipient.0,
        &id.0,
        &sent_at_ms.to_be_bytes(),
        body.as_bytes(),
    ])
}

/// Seals a message from `sender` (named `from`) to `recipient`, whose
/// verified sealing key is `recipient_key`.
pub fn seal(
    sender: &Identity,
    from: &Name,
    recipient: PeerId,
    recipient_key: &[u8; 32],
    id: MessageId,
    sent_at_ms: u64,
    body: &str,
) -> Result<Vec<u8>, SealError> {
    let sig = sender
        .key_pair()
        .sign(&letter_signed_bytes(recipient, id, sent_at_ms, body))
        .map_err(|_| SealError::Sign)?;
    let letter = Letter {
        from: from.clone(),
        from_id: sender.id(),
        id,
        sent_at_ms,
        body: body.to_owned(),
        sig,
    };
    let plaintext = postcard::to_stdvec(&letter).map_err(|_| SealError::Malformed)?;
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient_key)
        .map_err(|_| SealError::BadRecipientKey)?;
    let info = concat(&[INFO_CONTEXT, &recipient.0]);
    let (encapped, ciphertext) =
        hpke::single_shot_seal::<Aead, Kdf, Kem>(&OpModeS::Base, &pk, &info, &plaintext, &[])
            .map_err(|_| SealError::Encrypt)?;
    let mut out = encapped.to_bytes().to_vec();
    out.extend_from_slice(&ciphertext);
    if out.len() > MAX_SEALED_LEN {
        return Err(SealError::TooLarge);
    }
    Ok(out)
}

/// Opens a sealed message addressed to `me` and checks the sender's
/// signature against the `from_id` inside. The caller must still check that
/// `from_id` is the key it trusts for `from`.
pub fn open(keys: &SealKeys, me: PeerId, sealed: &[u8]) -> Result<Letter, SealError> {
    if sealed.len() < ENCAPPED_LEN || sealed.len() > MAX_SEALED_LEN {
        return Err(SealError::Malformed);
    }
    let (encapped, ciphertext) = sealed.split_at(ENCAPPED_LEN);
    let encapped =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(encapped).map_err(|_| SealError::Malformed)?;
    let info = concat(&[INFO_CONTEXT, &me.0]);
    let plaintext = hpke::single_shot_open::<Aead, Kdf, Kem>(
        &OpModeR::Base,
        &keys.secret,
        &encapped,
        &info,
        ciphertext,
        &[],
    )
    .map_err(|_| SealError::Open)?;
    let letter: Letter = crate::codec::decode(&plaintext).map_err(|_| SealError::Malformed)?;
    let signed = letter_signed_bytes(me, letter.id, letter.sent_at_ms, &letter.body);
    if !ed25519_verify(letter.from_id, &signed, &letter.sig) {
        return Err(SealError::BadSignature);
    }
    Ok(letter)
}

fn receipt_bytes(sender: PeerId, id: MessageId) -> Vec<u8> {
    concat(&[RECEIPT_CONTEXT, &sender.0, &id.0])
}

/// The recipient's signed statement that it showed message `id` from `sender`.
pub fn sign_receipt(
    recipient: &Identity,
    sender: PeerId,
    id: MessageId,
) -> Result<Vec<u8>, SealError> {
    recipient
        .key_pair()
        .sign(&receipt_bytes(sender, id))
        .map_err(|_| SealError::Sign)
}

/// Whether `receipt` is `recipient`'s signature for message `id` from `sender`.
pub fn verify_receipt(recipient: PeerId, sender: PeerId, id: MessageId, receipt: &[u8]) -> bool {
    ed25519_verify(recipient, &receipt_bytes(sender, id), receipt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Identity, Identity, SealKeys) {
        (
            Identity::generate().unwrap(),
            Identity::generate().unwrap(),
            SealKeys::generate(),
        )
    }

    #[test]
    fn sealed_message_opens_for_the_recipient_with_the_sender_verified() {
        let (alice, bob, bob_seal) = setup();
        let from = Name::parse("alice").unwrap();
        let id = MessageId::generate();
        let sealed = seal(
            &alice,
            &from,
            bob.id(),
            &bob_seal.public(),
            id,
            42,
            "hi bob",
        )
        .unwrap();
        let letter = open(&bob_seal, bob.id(), &sealed).unwrap();
        assert_eq!(letter.body, "hi bob");
        assert_eq!(letter.from_id, alice.id());
        assert_eq!(letter.id, id);
        assert_eq!(letter.sent_at_ms, 42);
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let (alice, bob, bob_seal) = setup();
        let from = Name::parse("alice").unwrap();
        let sealed = seal(
            &alice,
            &from,
            bob.id(),
            &bob_seal.public(),
            MessageId::generate(),
            1,
            "x",
        )
        .unwrap();
        for i in [0, 5, 31, 32, 40, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                open(&bob_seal, bob.id(), &bad).is_err(),
                "flip at byte {i} accepted"
            );
        }
        assert!(open(&bob_seal, bob.id(), &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn a_message_for_someone_else_does_not_open() {
        let (alice, bob, bob_seal) = setup();
        let carol = Identity::generate().unwrap();
        let from = Name::parse("alice").unwrap();
        let sealed = seal(
            &alice,
            &from,
            bob.id(),
            &bob_seal.public(),
            MessageId::generate(),
            1,
            "x",
        )
        .unwrap();
        // Right secret, but claimed for another identity: info differs.
        assert!(open(&bob_seal, carol.id(), &sealed).is_err());
        assert!(open(&SealKeys::generate(), bob.id(), &sealed).is_err());
    }

    #[test]
    fn a_letter_signed_by_another_key_is_rejected() {
        // The tracker (or anyone) can seal to bob, but cannot sign as alice.
        let (alice, bob, bob_seal) = setup();
        let mallory = Identity::generate().unwrap();
        let id = MessageId::generate();
        let sig = mallory
            .key_pair()
            .sign(&letter_signed_bytes(bob.id(), id, 1, "forged"))
            .unwrap();
        let letter = Letter {
            from: Name::parse("alice").unwrap(),
            from_id: alice.id(),
            id,
            sent_at_ms: 1,
            body: "forged".into(),
            sig,
        };
        let plaintext = postcard::to_stdvec(&letter).unwrap();
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&bob_seal.public()).unwrap();
        let info = concat(&[INFO_CONTEXT, &bob.id().0]);
        let (enc, ct) =
            hpke::single_shot_seal::<Aead, Kdf, Kem>(&OpModeS::Base, &pk, &info, &plaintext, &[])
                .unwrap();
        let mut sealed = enc.to_bytes().to_vec();
        sealed.extend_from_slice(&ct);
        assert!(matches!(
            open(&bob_seal, bob.id(), &sealed),
            Err(SealError::BadSignature)
        ));
    }

    #[test]
    fn seal_key_and_receipt_signatures_verify_only_for_their_signer() {
        let (alice, bob, bob_seal) = setup();
        let signed = sign_seal_key(&bob, &bob_seal).unwrap();
        assert!(verify_seal_key(bob.id(), &signed));
        assert!(!verify_seal_key(alice.id(), &signed));
        let id = MessageId::generate();
        let receipt = sign_receipt(&bob, alice.id(), id).unwrap();
        assert!(verify_receipt(bob.id(), alice.id(), id, &receipt));
        assert!(!verify_receipt(
            bob.id(),
            alice.id(),
            MessageId::generate(),
            &receipt
        ));
        assert!(!verify_receipt(alice.id(), alice.id(), id, &receipt));
    }

    #[test]
    fn sealing_key_survives_save_and_load() {
        let dir = tempfile_dir();
        let path = dir.join("seal.key");
        let a = SealKeys::load_or_create(&path).unwrap();
        let b = SealKeys::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        fs::write(&path, b"short").unwrap();
        assert!(SealKeys::load_or_create(&path).is_err());
        let _ = fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tincan-seal-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
