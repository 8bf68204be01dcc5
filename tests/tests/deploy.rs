//! Deploy styles: every common way of putting a new build on the served path rolls to it with
//! no failed request, and the old workers go. Under `--watch`: cargo's unlink + hard link,
//! `cp` over the file, `rsync --inplace`, `install -m 755`, an atomic rename, and a
//! `current -> releases/N/libapp.so` symlink switch; without it, a `current -> releases/N`
//! directory switch followed by SIGHUP. The `reloaded` line names the release it resolved to.
//! The non-atomic styles may get a half-written file snapshotted when the writer pauses longer
//! than `--debounce`: that snapshot must be refused (never served) before the finished file
//! rolls, which one test provokes on purpose.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use angel_tests::rebuild::*;
use angel_tests::*;

/// The body of the app template (`lib("app")`), the new build of these tests.
const APP_BODY: &str = "Hello from angel-host\n";

fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().canonicalize().expect("canonicalize tempdir");
    (dir, path)
}

/// After the roll: the old workers exit, the app template answers, the load saw no failure.
fn assert_rolled_cleanly(host: &Host, old: &BTreeSet<i32>, load: Load) {
    host.wait_exited(&old.iter().copied().collect::<Vec<_>>(), WAIT);
    load.wait_more(host, 20);
    for i in 0..5 {
        let resp = get(host.addr(), "/")
            .unwrap_or_else(|e| panic!("GET #{i}: {e}\n--- master stderr ---\n{}", host.log()));
        assert_eq!(resp.text(), APP_BODY, "GET #{i}\n{}", host.log());
    }
    assert!(
        load.first_seen("Hello from angel-host").is_some(),
        "the load saw the new build"
    );
    load.finish().assert_clean(host, 40);
}

fn watched_deploy_rolls_without_a_failed_request(style: Deploy) {
    let (_dir, dir) = canonical_tempdir();
    let served = dir.join("libapp.so");
    deploy(&lib("hello"), &served);
    let host = Host::builder(&served).dir(&dir).arg("--watch").start();
    let old: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    assert_eq!(old.len(), 2);
    let load = Load::start(host.addr(), 0, 2);
    load.wait_more(&host, 20);

    let inode_before = inode(&served);
    let mark = host.mark();
    let how = style.apply(&lib("app"), &served);
    eprintln!("deployed with {how}");
    if let Some(kept) = style.keeps_inode() {
        assert_eq!(inode(&served) == inode_before, kept, "{how}: inode kept?");
    }
    let sha = short_sha(&lib("app"));
    let line = if style.atomic() {
        // The path goes from one complete file to the other: one deploy, one roll.
        let line = wait_reloaded(&host, mark);
        let log = host.log_since(mark);
        let outcomes: Vec<&str> = log.lines().filter(|l| is_roll_outcome(l)).collect();
        assert_eq!(
            outcomes,
            [line.as_str()],
            "one deploy, one roll\n{}",
            host.log()
        );
        line
    } else {
        // A writer that pauses longer than --debounce may get a half-written file
        // snapshotted: it must be refused, never served, and the finished file must roll.
        let (line, refused) = wait_rolled_to(&host, mark, &sha);
        for r in &refused {
            eprintln!("{how}: a half-written snapshot was refused first: {r}");
        }
        line
    };
    assert!(
        line.contains(&format!("reloaded {} (generation ", served.display())),
        "{line}"
    );
    assert_eq!(
        sha_of(&line).as_deref(),
        Some(sha.as_str()),
        "rolled to the deployed bytes: {line}"
    );
    assert_rolled_cleanly(&host, &old, load);
}

#[test]
fn cargo_style_relink_under_watch_rolls_without_a_failed_request() {
    watched_deploy_rolls_without_a_failed_request(Deploy::CargoRelink);
}

#[test]
fn cp_over_the_library_under_watch_rolls_without_a_failed_request() {
    watched_deploy_rolls_without_a_failed_request(Deploy::Cp);
}

#[test]
fn rsync_inplace_under_watch_rolls_without_a_failed_request() {
    watched_deploy_rolls_without_a_failed_request(Deploy::RsyncInplace);
}

#[test]
fn install_under_watch_rolls_without_a_failed_request() {
    watched_deploy_rolls_without_a_failed_request(Deploy::Install);
}

#[test]
fn atomic_rename_under_watch_rolls_without_a_failed_request() {
    watched_deploy_rolls_without_a_failed_request(Deploy::Rename);
}

/// `ln -sfn target link`, atomically: a new symlink renamed over the old one.
fn switch_symlink(target: &Path, link: &Path) {
    let mut tmp = link.to_path_buf();
    tmp.as_mut_os_string().push(".new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("rename the new symlink over the old");
}

/// How a `current` symlink names the release.
#[derive(Debug, Clone, Copy)]
enum Current {
    /// `current -> releases/N` (a directory), `--lib current/libapp.so`.
    Dir,
    /// `current -> releases/N/libapp.so`, `--lib current`.
    File,
}

/// What makes the host roll after the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Hup,
    Watch,
}

fn symlink_switch_rolls_to_the_new_release(current: Current, trigger: Trigger) {
    let (_dir, dir) = canonical_tempdir();
    for (release, build) in [("1", "hello"), ("2", "app")] {
        let rel = dir.join("releases").join(release);
        std::fs::create_dir_all(&rel).unwrap();
        deploy(&lib(build), &rel.join("libapp.so"));
    }
    let link = dir.join("current");
    let target = |n: &str| match current {
        Current::Dir => PathBuf::from(format!("releases/{n}")),
        Current::File => PathBuf::from(format!("releases/{n}/libapp.so")),
    };
    let lib_path = match current {
        Current::Dir => link.join("libapp.so"),
        Current::File => link.clone(),
    };
    switch_symlink(&target("1"), &link);
    let mut builder = Host::builder(&lib_path).dir(&dir);
    if trigger == Trigger::Watch {
        builder = builder.arg("--watch");
    }
    let host = builder.start();
    let release = |n: &str| dir.join("releases").join(n).join("libapp.so");
    let serving = host.wait_log(" serving ", WAIT);
    assert!(
        serving.contains(&release("1").display().to_string()),
        "names the resolved release: {serving}"
    );
    let old: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    let load = Load::start(host.addr(), 0, 2);
    load.wait_more(&host, 20);

    let mark = host.mark();
    switch_symlink(&target("2"), &link);
    let line = match trigger {
        Trigger::Hup => host.roll(WAIT).line,
        Trigger::Watch => wait_reloaded(&host, mark),
    };
    assert!(
        line.contains(&format!(
            "reloaded {} (generation 2",
            release("2").display()
        )),
        "the reloaded line names releases/2: {line}"
    );
    assert_rolled_cleanly(&host, &old, load);
}

#[test]
fn symlink_switch_then_hup_rolls_to_the_new_release() {
    symlink_switch_rolls_to_the_new_release(Current::Dir, Trigger::Hup);
}

#[test]
fn file_symlink_switch_under_watch_rolls_to_the_new_release() {
    symlink_switch_rolls_to_the_new_release(Current::File, Trigger::Watch);
}

#[test]
fn dir_symlink_switch_under_watch_rolls_to_the_new_release() {
    symlink_switch_rolls_to_the_new_release(Current::Dir, Trigger::Watch);
}

#[test]
fn a_copy_that_pauses_midway_is_refused_then_rolls_when_finished() {
    use std::io::Write;
    let (_dir, dir) = canonical_tempdir();
    let served = dir.join("libapp.so");
    deploy(&lib("hello"), &served);
    let host = Host::builder(&served).dir(&dir).arg("--watch").start();
    let old: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    let load = Load::start(host.addr(), 0, 2);
    load.wait_more(&host, 20);

    // A `cp` whose writer stalls (a slow disk, a loaded box) for longer than --debounce, in the
    // middle of the library's loadable segments.
    let bytes = std::fs::read(lib("app")).unwrap();
    let cut = elf_loadable_len(&bytes) / 2;
    let mark = host.mark();
    let mut f = std::fs::File::create(&served).expect("truncate the served file");
    f.write_all(&bytes[..cut]).unwrap();
    f.flush().unwrap();
    let refused = wait_outcome(&host, mark).expect_err("half a library must not roll");
    assert!(
        refused.contains(&format!("] reload skipped: {}: ", served.display()))
            && refused.ends_with("; keeping generation 1"),
        "{refused}"
    );
    // The writer resumes and finishes: the complete library rolls.
    let mark = host.mark();
    f.write_all(&bytes[cut..]).unwrap();
    drop(f);
    let sha = short_sha(&lib("app"));
    let (line, more) = wait_rolled_to(&host, mark, &sha);
    assert!(more.is_empty(), "refused again: {more:?}");
    assert!(line.contains(" (generation "), "{line}");
    assert_rolled_cleanly(&host, &old, load);
}
