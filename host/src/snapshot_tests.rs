//! Unit tests of [`super`]: both stores, what survives deletion, and who gets blamed.

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;

use super::*;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use sha2::{Digest, Sha256};

/// What a worker would read when it loads `/proc/self/fd/N`.
fn through_fd(snap: &Snapshot) -> Vec<u8> {
    std::fs::read(format!("/proc/self/fd/{}", snap.fd().as_raw_fd())).expect("read through fd")
}

#[test]
fn memfd_snapshot_is_a_sealed_private_copy_that_survives_overwrite() {
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    std::fs::write(&lib, b"first build").expect("write");
    let dir = SnapshotDir::create(Some(&work.path().join("never-created"))).expect("store");
    assert_eq!(dir.location(), Location::Memory, "this kernel has memfd");
    assert!(!work.path().join("never-created").exists());
    let one = dir.take(&lib, 1).expect("snapshot");
    std::fs::write(&lib, b"second build").expect("overwrite");
    let two = dir.take(&lib, 2).expect("snapshot");
    assert_eq!(through_fd(&one), b"first build");
    assert_eq!(through_fd(&two), b"second build");
    assert_ne!(one.sha256, two.sha256);
    assert_eq!(one.source, std::fs::canonicalize(&lib).expect("canon"));
    assert_eq!(
        one.path,
        PathBuf::from(format!(
            "memfd:gen1-{}.so",
            &one.sha256.as_deref().expect("hashed")[..16]
        ))
    );
    // Sealed: not even the master can change a generation's code.
    let mut reopened = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", one.fd().as_raw_fd()))
        .expect("reopen for writing");
    assert!(reopened.write_all(b"patched").is_err(), "memfd not sealed");
    assert_eq!(through_fd(&one), b"first build");
}

#[test]
fn file_snapshot_stays_loadable_after_a_cleaner_deletes_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    std::fs::write(&lib, b"build").expect("write");
    let dir = SnapshotDir::create_dir(Some(work.path())).expect("dir");
    let Location::Dir(path) = dir.location() else {
        panic!("file store expected")
    };
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let snap = dir.take(&lib, 1).expect("snapshot");
    assert!(
        snap.path.starts_with(&path)
            && snap.path.ends_with(format!(
                "gen1-{}.so",
                &snap.sha256.as_deref().expect("hashed")[..16]
            ))
    );
    // systemd-tmpfiles / tmpreaper: the whole directory goes.
    std::fs::remove_dir_all(&path).expect("clean");
    assert_eq!(through_fd(&snap), b"build");
    dir.remove(&snap);
}

#[test]
fn symlinked_library_is_resolved_at_every_take() {
    let work = tempfile::tempdir().expect("tempdir");
    let (a, b) = (work.path().join("a.so"), work.path().join("b.so"));
    std::fs::write(&a, b"release a").expect("write");
    std::fs::write(&b, b"release b").expect("write");
    let current = work.path().join("current.so");
    std::os::unix::fs::symlink(&a, &current).expect("symlink");
    let dir = SnapshotDir::create(Some(work.path())).expect("dir");
    let one = dir.take(&current, 1).expect("take");
    assert!(one.source.ends_with("a.so"));
    std::fs::remove_file(&current).expect("unlink");
    std::os::unix::fs::symlink(&b, &current).expect("symlink");
    let two = dir.take(&current, 2).expect("take");
    assert!(two.source.ends_with("b.so"));
    assert_eq!(through_fd(&two), b"release b");
}

#[test]
fn leftovers_of_dead_masters_are_swept_live_ones_kept() {
    let work = tempfile::tempdir().expect("tempdir");
    let dead = work.path().join("angel-host.99999999.abc");
    let live = work
        .path()
        .join(format!("angel-host.{}.def", std::process::id()));
    let other = work.path().join("angel-host.notapid.x");
    for d in [&dead, &live, &other] {
        std::fs::create_dir(d).expect("mkdir");
    }
    sweep_dead(work.path(), "angel-host.", ".");
    assert!(!dead.exists());
    assert!(live.exists() && other.exists());
}

#[test]
fn missing_directory_and_empty_are_named() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = SnapshotDir::create(Some(work.path())).expect("dir");
    let missing = dir
        .take(&work.path().join("nope.so"), 1)
        .expect_err("missing");
    assert!(
        matches!(missing, SnapshotError::Missing { .. }),
        "{missing}"
    );
    let is_dir = dir.take(work.path(), 1).expect_err("dir");
    assert!(
        matches!(is_dir, SnapshotError::Directory { .. }),
        "{is_dir}"
    );
    let empty = work.path().join("empty.so");
    std::fs::write(&empty, b"").expect("write");
    let err = dir.take(&empty, 1).expect_err("empty");
    assert!(matches!(err, SnapshotError::Empty { .. }), "{err}");
}

#[test]
fn an_unusable_snapshot_location_is_named_not_the_library() {
    let work = tempfile::tempdir().expect("tempdir");
    // A parent that cannot hold a directory (here: a file; for a user, a temp dir without
    // write access) is the location's fault, exit code 1, and says where.
    let not_a_dir = work.path().join("plain-file");
    std::fs::write(&not_a_dir, b"x").expect("write");
    let err = SnapshotDir::create_dir(Some(&not_a_dir)).expect_err("not a directory");
    assert!(matches!(err, SnapshotError::Dir { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("snapshot directory {}", not_a_dir.display())),
        "{text}"
    );
    assert!(!text.contains("library"), "{text}");
}

/// Regression: sealing a written memfd failed with `EBUSY` under load (pages still
/// referenced), and the roll was skipped. A writable mapping makes `F_SEAL_WRITE` fail the same
/// way, deterministically; the seal must still take, and `write` must be refused after it.
#[test]
fn a_memfd_that_cannot_take_the_write_seal_is_still_sealed_against_writes() {
    use std::io::Write;
    let mut memfd = new_memfd(7).expect("memfd");
    memfd.write_all(&[1u8; 4096]).expect("write");
    // SAFETY: a fresh shared mapping of one page of our own memfd, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let plain = fcntl(
        memfd.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE),
    );
    assert_eq!(plain, Err(nix::errno::Errno::EBUSY), "the case under test");
    seal(&memfd).expect("sealed anyway");
    let e = memfd.write_all(b"x").expect_err("writes are refused");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // SAFETY: the mapping made above, of that length, used by nothing else.
    unsafe { libc::munmap(map, 4096) };
}

/// The inode of the copy a snapshot's fd refers to.
fn copy_inode(snap: &Snapshot) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", snap.fd().as_raw_fd()))
        .expect("stat copy")
        .ino()
}

#[test]
fn an_unchanged_settled_library_is_shared_not_copied_again() {
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    std::fs::write(&lib, b"build one").expect("write");
    let dir = SnapshotDir::create(None).expect("store");
    let later = SystemTime::now() + SETTLED * 2;
    let one = dir.take_at(&lib, 1, later, true).expect("take");
    let two = dir.take_at(&lib, 2, later, true).expect("take");
    assert_eq!(
        copy_inode(&one),
        copy_inode(&two),
        "the same memfd, not a new copy"
    );
    assert_eq!(two.sha256, one.sha256);
    assert_eq!(
        two.path,
        PathBuf::from(format!(
            "memfd:gen2-{}.so",
            &two.sha256.as_deref().expect("hashed")[..16]
        )),
        "named for its own generation"
    );
    assert_eq!(through_fd(&two), b"build one");
}

#[test]
fn a_library_written_in_place_after_a_shared_snapshot_is_copied_again() {
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    std::fs::write(&lib, b"build one").expect("write");
    // An old mtime (as `rsync -t` leaves), so the write below changes it even within one tick
    // of the clock.
    File::options()
        .write(true)
        .open(&lib)
        .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)))
        .expect("set mtime");
    let dir = SnapshotDir::create(None).expect("store");
    let later = SystemTime::now() + SETTLED * 2;
    let one = dir.take_at(&lib, 1, later, true).expect("take");
    // Same inode, same size, written in place (cp).
    std::fs::write(&lib, b"build two").expect("overwrite");
    let two = dir
        .take_at(&lib, 2, later + SETTLED * 2, true)
        .expect("take");
    assert_ne!(copy_inode(&one), copy_inode(&two));
    assert_eq!(through_fd(&two), b"build two");
    assert_ne!(one.sha256, two.sha256);
}

#[test]
fn a_library_changed_just_before_its_snapshot_is_never_shared() {
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    std::fs::write(&lib, b"fresh build").expect("write");
    let dir = SnapshotDir::create(None).expect("store");
    // Taken at once: a write in the same clock tick could leave the identity unchanged.
    let one = dir.take(&lib, 1).expect("take");
    let two = dir.take(&lib, 2).expect("take");
    assert_ne!(copy_inode(&one), copy_inode(&two), "copied again");
    assert_eq!(through_fd(&two), b"fresh build");
}

#[test]
fn the_hash_is_the_hash_of_what_was_copied() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("big.so");
    // Several chunks and a partial one.
    let data: Vec<u8> = (0..(CHUNK * 5 + 17)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).expect("write");
    let expected = format!("{:x}", Sha256::digest(&data));
    let mut from = File::open(&src).expect("open");
    let mut to = tempfile::tempfile().expect("tempfile");
    let (sha, total) =
        copy_hashing(&mut from, &mut to, true).unwrap_or_else(|_| panic!("copy failed"));
    assert_eq!(
        (sha.as_deref().expect("hashed"), total),
        (expected.as_str(), data.len() as u64)
    );
    let mut copied = Vec::new();
    to.seek(io::SeekFrom::Start(0)).expect("seek");
    to.read_to_end(&mut copied).expect("read");
    assert!(copied == data, "the copy differs");
}

#[test]
fn an_unhashed_snapshot_is_named_by_its_later_hash_and_a_shared_copy_keeps_it() {
    use sha2::{Digest, Sha256};
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    std::fs::write(&lib, b"build one").expect("write");
    let dir = SnapshotDir::create(None).expect("store");
    let later = SystemTime::now() + SETTLED * 2;
    let mut one = dir.take_at(&lib, 1, later, false).expect("take");
    assert_eq!(one.sha256, None, "not hashed while copied");
    assert_eq!(one.path, PathBuf::from("memfd:gen1.so"));
    assert_eq!(
        through_fd(&one),
        b"build one",
        "loadable before it is hashed"
    );
    dir.hash(&mut one).expect("hash");
    let want = format!("{:x}", Sha256::digest(b"build one"));
    assert_eq!(one.sha256.as_deref(), Some(want.as_str()));
    assert_eq!(
        one.path,
        PathBuf::from(format!("memfd:gen1-{}.so", &want[..16]))
    );
    // A later roll onto the unchanged file shares the copy and knows its hash already.
    let two = dir.take_at(&lib, 2, later, false).expect("take");
    assert_eq!(copy_inode(&one), copy_inode(&two));
    assert_eq!(two.sha256.as_deref(), Some(want.as_str()));
}

/// Polls until the memfd made ahead by [`SnapshotDir::prepare`] is there; its inode.
fn prepared_inode(dir: &SnapshotDir) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(p) = lock(&dir.prepared).as_ref() {
            return p.file.metadata().expect("fstat").ino();
        }
        assert!(Instant::now() < deadline, "no memfd was prepared in 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn memfd_name(snap: &Snapshot) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", snap.fd().as_raw_fd()))
        .expect("readlink")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_prepared_memfd_takes_the_next_copy_at_its_exact_size_sealed_and_only_for_its_generation() {
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    let build = |len: usize, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    let dir = SnapshotDir::create(None).expect("store");
    std::fs::write(&lib, build(300_000, 1)).expect("write");
    let one = dir.take_unhashed(&lib, 1).expect("take");
    assert_eq!(through_fd(&one), build(300_000, 1), "copied in the kernel");
    // Ahead of generation 2: a smaller build, then (for 3) one larger than was allocated.
    dir.prepare(2);
    let ino = prepared_inode(&dir);
    std::fs::write(&lib, build(100_000, 2)).expect("write");
    let two = dir.take_unhashed(&lib, 2).expect("take");
    assert_eq!(copy_inode(&two), ino, "the prepared memfd was not used");
    assert_eq!(through_fd(&two), build(100_000, 2), "not cut to its size");
    assert!(
        memfd_name(&two).contains("angel-host gen2"),
        "{}",
        memfd_name(&two)
    );
    let mut reopened = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", two.fd().as_raw_fd()))
        .expect("reopen for writing");
    assert!(reopened.write_all(b"patched").is_err(), "not sealed");
    dir.prepare(3);
    let ino = prepared_inode(&dir);
    std::fs::write(&lib, build(900_000, 3)).expect("write");
    let three = dir.take(&lib, 3).expect("take, hashing");
    assert_eq!(copy_inode(&three), ino);
    assert_eq!(through_fd(&three), build(900_000, 3));
    let want = format!("{:x}", Sha256::digest(build(900_000, 3)));
    assert_eq!(three.sha256.as_deref(), Some(want.as_str()));
    // Made for 4, so not the copy of 5 (its name would say 4), and kept for a 4.
    dir.prepare(4);
    let ino = prepared_inode(&dir);
    std::fs::write(&lib, build(1000, 5)).expect("write");
    let five = dir.take_unhashed(&lib, 5).expect("take");
    assert_ne!(copy_inode(&five), ino);
    assert!(memfd_name(&five).contains("angel-host gen5"));
    assert_eq!(prepared_inode(&dir), ino);
}

#[test]
fn a_hash_beside_the_copy_is_the_hash_of_what_was_copied_and_a_shared_copy_gets_none() {
    let work = tempfile::tempdir().expect("tempdir");
    let lib = work.path().join("libapp.so");
    // Several of the copy's reporting steps, and a last one that is not whole.
    let content: Vec<u8> = (0..3 * FOLLOW_STEP + 12_345)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    std::fs::write(&lib, &content).expect("write");
    let dir = SnapshotDir::create(None).expect("store");
    let mut jobs = Vec::new();
    let (snap, started) = dir
        .take_hashing_beside(&lib, 1, &mut |job| {
            jobs.push(std::thread::spawn(job));
            true
        })
        .expect("take");
    assert!(started);
    assert_eq!(snap.sha256, None, "the copy is usable before its hash");
    assert_eq!(through_fd(&snap), content);
    let [job] = <[_; 1]>::try_from(jobs).expect("one hash job");
    let sha = job.join().expect("join").expect("hash");
    let want = format!("{:x}", Sha256::digest(&content));
    assert_eq!(sha.as_deref(), Some(want.as_str()));
    // A later roll onto the unchanged, settled file shares the copy: nothing to hash beside.
    let later = SystemTime::now() + SETTLED * 2;
    let one = dir.take_at(&lib, 2, later, true).expect("take");
    let mut start = |_: HashJob| -> bool { panic!("a shared copy is not copied") };
    let shared = dir.copy_at(&lib, 3, later, false, Some(&mut start));
    assert_eq!(copy_inode(&one), copy_inode(&shared.expect("take")));
}

#[test]
fn a_hash_beside_an_abandoned_copy_ends_with_nothing_to_report() {
    let copy = memfd::new_memfd(1).expect("memfd");
    let mut writer = copy.try_clone().expect("dup");
    writer.write_all(&[7; 1000]).expect("write");
    let progress = Arc::new(Progress::default());
    let follow = {
        let progress = Arc::clone(&progress);
        std::thread::spawn(move || hash_following(&copy, &progress))
    };
    progress.advance(1000);
    progress.abandon();
    assert_eq!(follow.join().expect("join").expect("no error"), None);
    // A finished copy is not abandoned after the fact.
    progress.finish(1000);
    progress.abandon();
    let copy = memfd::new_memfd(1).expect("memfd");
    copy.try_clone()
        .expect("dup")
        .write_all(&[7; 1000])
        .expect("write");
    assert_eq!(
        hash_following(&copy, &progress).expect("hash"),
        Some(format!("{:x}", Sha256::digest([7u8; 1000])))
    );
}
