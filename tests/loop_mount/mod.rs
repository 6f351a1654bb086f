//! A small real ext4 filesystem on a loop device, for tests where a full disk is the point.
//! Needs root (mkfs.ext4, losetup, mount); callers skip, saying so, when it cannot be made.
//! Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub struct Mounted {
    pub mount: PathBuf,
    loop_dev: String,
    _tmp: tempfile::TempDir,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A freshly made 24 MiB ext4 filesystem, mounted; or why not.
pub fn small_filesystem() -> Result<Mounted, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = tmp.path().join("fs.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(24 << 20))
        .map_err(|e| e.to_string())?;
    let image_s = image.to_string_lossy().to_string();
    run("mkfs.ext4", &["-q", "-F", "-m", "0", &image_s])?;
    let loop_dev = run("losetup", &["--find", "--show", &image_s])?;
    let mount = tmp.path().join("mnt");
    std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
    let m = Mounted {
        mount: mount.clone(),
        loop_dev: loop_dev.clone(),
        _tmp: tmp,
    };
    run("mount", &[&loop_dev, &mount.to_string_lossy()])?;
    Ok(m)
}

/// The small filesystem with `ballast_bytes` taken by a file `ballast` (less to fill, and room to
/// give back later); or none, with a loud line saying that `test` tested nothing and why.
pub fn with_ballast(test: &str, ballast_bytes: usize) -> Option<Mounted> {
    match small_filesystem() {
        Ok(fs) => {
            std::fs::write(fs.mount.join("ballast"), vec![1u8; ballast_bytes]).expect("ballast");
            Some(fs)
        }
        Err(why) => {
            println!(
                "SKIPPED (nothing tested): {test} needs a loop-mounted ext4 filesystem \
                 (root, losetup, mkfs.ext4, mount): {why}"
            );
            None
        }
    }
}

/// A body of `bytes` that names its publish sequence number (read back by `seq_of`).
pub fn numbered_body(seq: u64, bytes: usize) -> Vec<u8> {
    let mut b = format!("m{seq:08}").into_bytes();
    b.resize(bytes, b'.');
    b
}

/// The sequence number a `numbered_body` names.
pub fn seq_of(body: &[u8]) -> u64 {
    std::str::from_utf8(&body[1..9]).unwrap().parse().unwrap()
}
