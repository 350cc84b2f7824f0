//! Reading TLS material from PEM files, with errors that name the file and
//! what is wrong with it: certificates, private keys, CAs, and a
//! certificate and key checked to belong together. Used by the HTTPS side
//! ([`super::load`]) and by the health checks' TLS options (`main.rs`).

use super::{provider, TlsError};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// Reads `path` and returns its PEM sections; `what` names the file in
/// errors ("TLS certificate", ...).
fn read_pem(path: &Path, what: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError::new(format!("cannot read the {what} {}: {e}", path.display())))?;
    pem_sections(&bytes)
        .map_err(|why| TlsError::new(format!("the {what} {} {why}", path.display())))
}

/// The PEM sections of `bytes`, or why there are none to use (said after
/// the file's name).
fn pem_sections(bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not valid PEM: {e}"))?;
    if sections.is_empty() {
        let encrypted = bytes
            .windows(b"ENCRYPTED PRIVATE KEY".len())
            .any(|w| w == b"ENCRYPTED PRIVATE KEY");
        return Err(if encrypted {
            "holds an encrypted private key: give it unencrypted (`openssl pkey -in <file>`)"
                .to_owned()
        } else if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            "holds no PEM block this server reads (CERTIFICATE or PRIVATE KEY)".to_owned()
        } else {
            "is not PEM (no -----BEGIN ...----- line; DER converts with `openssl x509 -inform der`)"
                .to_owned()
        });
    }
    Ok(sections)
}

/// The PEM labels of `sections`, for "holds no certificate (its PEM
/// blocks: PRIVATE KEY)".
fn kinds(sections: &[(SectionKind, Vec<u8>)]) -> String {
    let labels: Vec<String> = sections
        .iter()
        .map(|(kind, _)| match kind {
            SectionKind::Certificate => "CERTIFICATE".to_owned(),
            SectionKind::PrivateKey => "PRIVATE KEY".to_owned(),
            SectionKind::RsaPrivateKey => "RSA PRIVATE KEY".to_owned(),
            SectionKind::EcPrivateKey => "EC PRIVATE KEY".to_owned(),
            SectionKind::PublicKey => "PUBLIC KEY".to_owned(),
            SectionKind::Csr => "CERTIFICATE REQUEST".to_owned(),
            SectionKind::Crl => "X509 CRL".to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    labels.join(", ")
}

/// Every certificate in the PEM file `path`, in order; at least one.
pub fn read_certificates(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = read_pem(path, what)?;
    let certificates: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if certificates.is_empty() {
        return Err(TlsError::new(format!(
            "the {what} {} holds no certificate (its PEM blocks: {})",
            path.display(),
            kinds(&sections)
        )));
    }
    Ok(certificates)
}

/// The first private key in the PEM file `path`.
pub fn read_private_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let sections = read_pem(path, what)?;
    sections
        .iter()
        .find_map(|(kind, der)| match kind {
            SectionKind::PrivateKey => Some(PrivateKeyDer::Pkcs8(der.clone().into())),
            SectionKind::RsaPrivateKey => Some(PrivateKeyDer::Pkcs1(der.clone().into())),
            SectionKind::EcPrivateKey => Some(PrivateKeyDer::Sec1(der.clone().into())),
            _ => None,
        })
        .ok_or_else(|| {
            TlsError::new(format!(
                "the {what} {} holds no private key (its PEM blocks: {})",
                path.display(),
                kinds(&sections)
            ))
        })
}

/// The CA certificates of `path` as trust anchors.
pub(super) fn read_roots(path: &Path, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, certificate) in read_certificates(path, what)?.into_iter().enumerate() {
        roots.add(certificate).map_err(|e| {
            TlsError::new(format!(
                "the {what} {}: certificate {} cannot be a trust anchor: {e}",
                path.display(),
                i + 1
            ))
        })?;
    }
    Ok(roots)
}

/// `chain` and `key` as one signing identity, checking that the key is
/// the leaf certificate's; `what` names the pair in errors ("TLS",
/// "health-check client").
pub(super) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    (cert_path, key_path): (&Path, &Path),
    what: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        TlsError::new(format!(
            "the {what} key {} cannot be used: {e}",
            key_path.display()
        ))
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::new(format!(
                "the {what} key {} does not match the certificate {}: the certificate \
                 was issued for another key (was one replaced without the other?)",
                key_path.display(),
                cert_path.display()
            )))
        }
        Err(e) => Err(TlsError::new(format!(
            "the {what} certificate {} cannot be parsed: {e}",
            cert_path.display()
        ))),
    }
}

/// A client certificate and key checked to belong together, as the PEM
/// bytes they were read from (what tonic's `Identity` takes).
pub fn read_identity(cert: &Path, key: &Path, what: &str) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let chain = read_certificates(cert, &format!("{what} certificate"))?;
    let der = read_private_key(key, &format!("{what} key"))?;
    certified_key(chain, der, (cert, key), what, &provider())?;
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| TlsError::new(format!("cannot read {}: {e}", path.display())))
    };
    Ok((read(cert)?, read(key)?))
}

/// A CA file checked to hold usable trust anchors, as its PEM bytes.
pub fn read_ca(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    read_roots(path, what)?;
    std::fs::read(path)
        .map_err(|e| TlsError::new(format!("cannot read the {what} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_problems_are_named() {
        let not_pem = pem_sections(b"\x30\x82\x01\x0a binary DER").expect_err("DER");
        assert!(not_pem.starts_with("is not PEM"), "{not_pem}");
        let encrypted = pem_sections(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .expect_err("encrypted");
        assert!(encrypted.contains("encrypted private key"), "{encrypted}");
        let cut = pem_sections(b"-----BEGIN CERTIFICATE-----\nAAAA\n").expect_err("cut short");
        assert!(cut.starts_with("is not valid PEM"), "{cut}");
        let sections =
            pem_sections(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .expect("one block");
        assert_eq!(kinds(&sections), "CERTIFICATE");
    }
}
