//! Test certificates for the TLS layout ([`TestCa`]): a CA and the
//! certificates it signs, made with openssl in a test's own directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A test CA made with openssl in a directory (`<name>-ca.pem`,
/// `<name>-ca.key`), and the certificates it issues there. Keys are
/// ECDSA P-256 unless [`TestCa::rsa`] asks for RSA 2048.
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
    /// The CA certificate (PEM): what a peer trusts.
    pub cert: PathBuf,
    key: PathBuf,
    rsa: bool,
}

/// A certificate and its key, issued by a [`TestCa`].
#[derive(Debug, Clone)]
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Its serial number, as openssl was told it (hex).
    pub serial: String,
}

impl TestCa {
    /// A new CA called `name` under `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<TestCa, String> {
        Self::make(dir, name, false)
    }

    /// The same, with RSA 2048 keys (for the CA and what it issues).
    pub fn rsa(dir: &Path, name: &str) -> Result<TestCa, String> {
        Self::make(dir, name, true)
    }

    fn make(dir: &Path, name: &str, rsa: bool) -> Result<TestCa, String> {
        let config = dir.join(format!("{name}-ca.cnf"));
        std::fs::write(
            &config,
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name} test CA\n\
                 [ext]\nbasicConstraints = critical,CA:TRUE\n\
                 keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n"
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let ca = TestCa {
            dir: dir.to_path_buf(),
            cert: dir.join(format!("{name}-ca.pem")),
            key: dir.join(format!("{name}-ca.key")),
            rsa,
        };
        let mut args = vec![
            "req".to_owned(),
            "-x509".to_owned(),
            "-config".to_owned(),
            path_arg(&config),
            "-extensions".to_owned(),
            "ext".to_owned(),
        ];
        args.extend(ca.new_key_args());
        args.extend(
            [
                "-nodes",
                "-keyout",
                &path_arg(&ca.key),
                "-out",
                &path_arg(&ca.cert),
                "-days",
                "2",
            ]
            .map(str::to_owned),
        );
        openssl(dir, &args)?;
        Ok(ca)
    }

    fn new_key_args(&self) -> Vec<String> {
        let args: &[&str] = if self.rsa {
            &["-newkey", "rsa:2048"]
        } else {
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        };
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    /// Issues `<name>.pem` and `<name>.key` for `sans` (`DNS:name`,
    /// `IP:10.0.0.1`), usable by a server and a client, with the serial
    /// `serial` (hex; distinct serials tell two certificates apart).
    pub fn issue(&self, name: &str, sans: &[&str], serial: u64) -> Result<TestCert, String> {
        let ext = self.dir.join(format!("{name}.ext"));
        let mut text = String::from(
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth,clientAuth\nsubjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid\n",
        );
        if !sans.is_empty() {
            text.push_str(&format!("subjectAltName = {}\n", sans.join(",")));
        }
        std::fs::write(&ext, text).map_err(|e| format!("{}: {e}", ext.display()))?;
        let cert = TestCert {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            serial: format!("{serial:X}"),
        };
        let csr = self.dir.join(format!("{name}.csr"));
        let mut args = vec!["req".to_owned(), "-new".to_owned()];
        args.extend(self.new_key_args());
        args.extend(
            [
                "-nodes",
                "-keyout",
                &path_arg(&cert.key),
                "-out",
                &path_arg(&csr),
                "-subj",
                &format!("/CN={name}"),
            ]
            .map(str::to_owned),
        );
        openssl(&self.dir, &args)?;
        let args = [
            "x509",
            "-req",
            "-in",
            &path_arg(&csr),
            "-CA",
            &path_arg(&self.cert),
            "-CAkey",
            &path_arg(&self.key),
            "-set_serial",
            &format!("0x{}", cert.serial),
            "-days",
            "2",
            "-extfile",
            &path_arg(&ext),
            "-out",
            &path_arg(&cert.cert),
        ]
        .map(str::to_owned);
        openssl(&self.dir, &args)?;
        Ok(cert)
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `openssl args` in `dir`; its stderr is the error.
fn openssl(dir: &Path, args: &[String]) -> Result<(), String> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
