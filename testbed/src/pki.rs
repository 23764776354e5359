//! A throwaway certificate authority and the certificates it signs, made with the
//! `openssl` command: a server certificate (for 127.0.0.1) and a client certificate for
//! TLS tests, or one RSA certificate per node for IKE.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestPki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| anyhow::anyhow!("openssl: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The kind of key every certificate of a [`TestPki`] gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// P-256, for TLS.
    Ec,
    /// RSA 2048 in the traditional (PKCS#1) form: Debian's charon has no ECDSA without its
    /// openssl plugin, and reads PKCS#1 keys with its pkcs1 plugin.
    Rsa,
}

impl KeyKind {
    fn generate(self, dir: &Path, key: &str) -> anyhow::Result<()> {
        match self {
            KeyKind::Ec => openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-out",
                    key,
                ],
            ),
            KeyKind::Rsa => openssl(dir, &["genrsa", "-traditional", "-out", key, "2048"]),
        }
    }
}

/// One certificate the CA signs: files `NAME.key` and `NAME.pem`, subject `/CN=CN`, and
/// the X.509 extensions in `ext` (openssl's extfile syntax).
pub struct Leaf<'a> {
    pub name: &'a str,
    pub cn: &'a str,
    pub ext: &'a str,
}

impl TestPki {
    /// A P-256 CA with a server certificate for 127.0.0.1 (`server.pem`) and a client
    /// certificate (`client.pem`).
    pub fn generate() -> anyhow::Result<TestPki> {
        Self::with_leaves(
            KeyKind::Ec,
            "vipsec-test-ca",
            &[
                Leaf {
                    name: "server",
                    cn: "127.0.0.1",
                    ext: "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
                },
                Leaf {
                    name: "client",
                    cn: "vipsec-agent",
                    ext: "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
                },
            ],
        )
    }

    /// An RSA CA with one certificate per node name (`NAME.pem`, `NAME.key`), the name as
    /// its CN and DNS subjectAltName: IKE identities for charon.
    pub fn rsa_nodes(nodes: &[&str]) -> anyhow::Result<TestPki> {
        let exts: Vec<String> = nodes
            .iter()
            .map(|n| format!("subjectAltName=DNS:{n}\nbasicConstraints=CA:FALSE\n"))
            .collect();
        let leaves: Vec<Leaf> = nodes
            .iter()
            .zip(&exts)
            .map(|(n, ext)| Leaf {
                name: n,
                cn: n,
                ext,
            })
            .collect();
        Self::with_leaves(KeyKind::Rsa, "vipsec-policy-ca", &leaves)
    }

    /// A CA (`ca.pem`, `ca.key`, subject `/CN=CA_CN`) and the certificates it signs, valid
    /// for two days.
    pub fn with_leaves(kind: KeyKind, ca_cn: &str, leaves: &[Leaf]) -> anyhow::Result<TestPki> {
        crate::require_program("openssl")?;
        let dir = tempfile::Builder::new().prefix("vipsec-pki-").tempdir()?;
        let d = dir.path();
        kind.generate(d, "ca.key")?;
        let ca_subj = format!("/CN={ca_cn}");
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                &ca_subj,
                "-days",
                "2",
                "-out",
                "ca.pem",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        for Leaf { name, cn, ext } in leaves {
            let subj = format!("/CN={cn}");
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            let extfile = format!("{name}.ext");
            std::fs::write(d.join(&extfile), ext)?;
            kind.generate(d, &key)?;
            openssl(
                d,
                &["req", "-new", "-key", &key, "-subj", &subj, "-out", &csr],
            )?;
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-out",
                    &pem,
                    "-extfile",
                    &extfile,
                ],
            )?;
        }
        Ok(TestPki { dir })
    }

    /// The contents of one of its files.
    pub fn read(&self, file: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.path(file);
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }
}
