//! HGitaly, a third-party server of the Gitaly protocol (Python, over Mercurial), started
//! on a free loopback port over a temporary storage root, stopped when dropped.
//! `.ci/install` puts it in `.ci/.venv-hgitaly`; `KAS_HGITALY_HG` may name another `hg`
//! that has the hgitaly extension.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct HGitaly {
    child: Child,
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    hg: PathBuf,
    hgrc: PathBuf,
}

impl Drop for HGitaly {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `hg` that has HGitaly, or a panic saying how to get it.
pub fn hg_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KAS_HGITALY_HG") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/.venv-hgitaly/bin/hg");
    assert!(
        venv.exists(),
        "HGitaly is not installed: run .ci/install (it creates .ci/.venv-hgitaly) \
         or set KAS_HGITALY_HG to an hg with the hgitaly extension"
    );
    venv
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl HGitaly {
    /// Starts HGitaly and waits (at most 60 s) until it accepts connections.
    pub fn start() -> Self {
        let hg = hg_binary();
        let root = tempfile::tempdir().expect("temp dir");
        let hgrc = root.path().join("hgrc");
        std::fs::write(
            &hgrc,
            format!(
                "[extensions]\ntopic =\nevolve =\nrebase =\nheptapod =\nhgitaly =\n\
                 [heptapod]\nrepositories-root = {}\nnative = true\n\
                 [ui]\nusername = kas test <kas-test@example.invalid>\n",
                root.path().display()
            ),
        )
        .expect("write hgrc");
        // A free port, released for HGitaly to take (it has no "port 0" report).
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(&hg)
            .args(["hgitaly-serve", "--repositories-root"])
            .arg(root.path())
            .args(["--listen", &format!("tcp://{addr}"), "--mono-process"])
            .env("HGRCPATH", &hgrc)
            .env("HEPTAPOD_SKIP_ALL_GITLAB_HOOKS", "yes")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hg hgitaly-serve starts");
        let server = Self {
            child,
            addr,
            root,
            hg,
            hgrc,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "HGitaly did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn address(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    fn hg(&self, repo: &Path, args: &[&str]) -> String {
        let out = Command::new(&self.hg)
            .arg("--cwd")
            .arg(repo)
            .args(args)
            .env("HGRCPATH", &self.hgrc)
            .env("HEPTAPOD_SKIP_ALL_GITLAB_HOOKS", "yes")
            .stdin(Stdio::null())
            .output()
            .expect("hg runs");
        assert!(
            out.status.success(),
            "hg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates `<root>/<relative_path>` (e.g. `demo/project.hg`), a native Heptapod
    /// repository whose GitLab default branch is `branch/default`.
    pub fn create_repo(&self, relative_path: &str) -> PathBuf {
        let repo = self.root.path().join(relative_path);
        std::fs::create_dir_all(repo.parent().expect("parent")).expect("mkdir");
        let out = Command::new(&self.hg)
            .arg("init")
            .arg(&repo)
            .env("HGRCPATH", &self.hgrc)
            .output()
            .expect("hg init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::copy(&self.hgrc, repo.join(".hg/hgrc")).expect("repo hgrc");
        std::fs::write(repo.join(".hg/default_gitlab_branch"), "branch/default")
            .expect("default branch");
        repo
    }

    /// Writes (`Some`) or removes (`None`) files and commits; returns the commit id.
    pub fn commit(&self, repo: &Path, files: &[(&str, Option<&[u8]>)]) -> String {
        for (path, content) in files {
            let file = repo.join(path);
            match content {
                Some(content) => {
                    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
                    std::fs::write(&file, content).expect("write");
                }
                None => {
                    let _ = std::fs::remove_file(&file);
                }
            }
        }
        self.hg(repo, &["addremove", "-q"]);
        self.hg(repo, &["commit", "-q", "-m", "kas test commit"]);
        self.hg(repo, &["log", "-r", ".", "-T", "{node}"])
    }
}
