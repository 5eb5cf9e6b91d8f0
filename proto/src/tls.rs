//! Identities and trust: who a peer or tracker is, and how each side checks.
//!
//! Every peer and every tracker has a long-lived Ed25519 key pair; its
//! [`PeerId`] is the raw public key. TLS 1.3 certificates are self-signed
//! (rcgen) and carry that key. There is no CA: a dialer names the key it
//! expects and the verifier refuses any other ([`client_config`]), and an
//! acceptor takes any well-formed key and leaves authorization to the
//! application, which knows which name that key is bound to ([`server_config`]).
//! Either way the TLS handshake proves the remote side holds the private key.

use std::{fs, io::Write, path::Path, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use crate::PeerId;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32-byte
/// key follows it. Only Ed25519 keys are tincan identities.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Server name put in every ClientHello. Verifiers ignore it: keys are pinned.
pub const SERVER_NAME: &str = "tincan";

/// Loading, creating or using an identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write identity key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("identity key {path} is not a valid Ed25519 PKCS#8 PEM key: {reason}")]
    Invalid { path: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] TlsError),
}

/// A key pair and the self-signed certificate that presents it.
pub struct Identity {
    key_pair: rcgen::KeyPair,
    cert: CertificateDer<'static>,
    id: PeerId,
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Result<Self, IdentityError> {
        Self::from_key_pair(rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?)
    }

    /// Loads the PEM key at `path`, or creates one there (mode 0600) if the
    /// file does not exist. A file that exists but does not parse is an
    /// error: silently replacing it would change who this peer is.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        let shown = path.display().to_string();
        match fs::read_to_string(path) {
            Ok(pem) => {
                let key_pair =
                    rcgen::KeyPair::from_pem(&pem).map_err(|e| IdentityError::Invalid {
                        path: shown.clone(),
                        reason: e.to_string(),
                    })?;
                if key_pair.algorithm() != &rcgen::PKCS_ED25519 {
                    return Err(IdentityError::Invalid {
                        path: shown,
                        reason: "not an Ed25519 key".into(),
                    });
                }
                Self::from_key_pair(key_pair)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let identity = Self::generate()?;
                write_private(path, identity.key_pair.serialize_pem().as_bytes()).map_err(
                    |source| IdentityError::Write {
                        path: shown,
                        source,
                    },
                )?;
                Ok(identity)
            }
            Err(source) => Err(IdentityError::Read {
                path: shown,
                source,
            }),
        }
    }

    fn from_key_pair(key_pair: rcgen::KeyPair) -> Result<Self, IdentityError> {
        let id =
            PeerId(
                key_pair
                    .public_key_raw()
                    .try_into()
                    .map_err(|_| IdentityError::Invalid {
                        path: String::new(),
                        reason: "public key is not 32 bytes".into(),
                    })?,
            );
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let cert = params.self_signed(&key_pair)?.der().clone();
        Ok(Self { key_pair, cert, id })
    }

    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The key pair, for signatures outside TLS (see [`crate::seal`]).
    pub(crate) fn key_pair(&self) -> &rcgen::KeyPair {
        &self.key_pair
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pair.serialize_der()))
    }
}

/// Writes `bytes` to a new file readable only by its owner.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The tincan identity carried by a certificate: its Ed25519 public key.
pub fn peer_id_of(cert: &CertificateDer<'_>) -> Result<PeerId, TlsError> {
    let bad = || TlsError::InvalidCertificate(CertificateError::BadEncoding);
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|_| bad())?;
    let spki = parsed.subject_public_key_info();
    let key = spki
        .as_ref()
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .ok_or_else(bad)?;
    Ok(PeerId(key.try_into().map_err(|_| bad())?))
}

/// The identity a finished QUIC/TLS handshake proved for the remote side.
pub fn remote_id(certs: &[CertificateDer<'static>]) -> Result<PeerId, TlsError> {
    let cert = certs.first().ok_or(TlsError::NoCertificatesPresented)?;
    peer_id_of(cert)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client side (dialer): presents `identity`, and accepts only a server whose
/// key is `expected`; `None` accepts any key (first contact with a tracker,
/// which the caller then pins).
pub fn client_config(
    identity: &Identity,
    alpn: &[u8],
    expected: Option<PeerId>,
) -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServerKey {
        expected,
        algs: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.private_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Server side (acceptor): presents `identity` and requires a client
/// certificate holding an Ed25519 key; which keys are welcome is the
/// application's decision once the handshake is done.
pub fn server_config(
    identity: &Identity,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(AnyClientKey {
        algs: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.private_key())?;
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// The remote key did not match the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("remote key {found} is not the expected key {expected}")]
pub struct KeyMismatch {
    pub expected: String,
    pub found: String,
}

#[derive(Debug)]
struct PinnedServerKey {
    expected: Option<PeerId>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let found = peer_id_of(end_entity)?;
        match self.expected {
            Some(expected) if expected != found => Err(TlsError::InvalidCertificate(
                CertificateError::Other(rustls::OtherError(Arc::new(KeyMismatch {
                    expected: expected.short(),
                    found: found.short(),
                }))),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[derive(Debug)]
struct AnyClientKey {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        peer_id_of(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let identity = Identity::generate().unwrap();
        assert_eq!(peer_id_of(&identity.cert).unwrap(), identity.id());
    }

    #[test]
    fn identity_survives_save_and_load() {
        let dir = std::env::temp_dir().join(format!("tincan-id-{}", std::process::id()));
        let path = dir.join("identity.pem");
        let _ = fs::remove_file(&path);
        let first = Identity::load_or_create(&path).unwrap();
        let second = Identity::load_or_create(&path).unwrap();
        assert_eq!(first.id(), second.id());
        fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            Identity::load_or_create(&path),
            Err(IdentityError::Invalid { .. })
        ));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn non_certificate_bytes_are_rejected() {
        assert!(peer_id_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
