//! `tarta passwd`: manages Mosquitto-format password files, with
//! `mosquitto_passwd`'s options, writing `$7$` (PBKDF2-SHA512) lines that
//! Mosquitto's broker reads too.
//!
//! ```text
//! tarta passwd [-c] [-I ITERATIONS] FILE USER        asks twice, no echo
//! tarta passwd [-c] [-I ITERATIONS] -b FILE USER PASSWORD
//! tarta passwd -D FILE USER                          deletes USER
//! tarta passwd [-I ITERATIONS] -U FILE               hashes plaintext lines in place
//! ```
//!
//! The file is replaced atomically (written beside it, then renamed) and a
//! new file is created readable by its owner only.

use std::io::{BufRead, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use tarta_proto::passwd::{self, Hash, Line, DEFAULT_ITERATIONS, MAX_ITERATIONS};

const USAGE: &str = "\
usage: tarta passwd [-c] [-I ITERATIONS] FILE USER
       tarta passwd [-c] [-I ITERATIONS] -b FILE USER PASSWORD
       tarta passwd -D FILE USER
       tarta passwd [-I ITERATIONS] -U FILE
 -b  batch mode: the password is the last argument
 -c  create (or overwrite) FILE
 -D  delete USER
 -I  PBKDF2 iterations (default 101, as mosquitto_passwd)
 -U  hash every plaintext password in FILE (already hashed lines are kept)
 -H  sha512-pbkdf2 (the only hash written; accepted for mosquitto_passwd scripts)";

#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    create: bool,
    batch: bool,
    delete: bool,
    update: bool,
    iterations: Option<u32>,
    rest: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-c" => a.create = true,
            "-b" => a.batch = true,
            "-D" => a.delete = true,
            "-U" => a.update = true,
            "-I" => {
                let n = it.next().ok_or("-I needs a number")?;
                let n: u32 = n.parse().map_err(|_| format!("-I {n}: not a number"))?;
                if n == 0 || n > MAX_ITERATIONS {
                    return Err(format!("-I must be 1..={MAX_ITERATIONS}"));
                }
                a.iterations = Some(n);
            }
            "-H" => match it.next().map(String::as_str) {
                Some("sha512-pbkdf2") => {}
                Some(h) => return Err(format!("-H {h}: only sha512-pbkdf2 is written")),
                None => return Err("-H needs a hash name".into()),
            },
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ => a.rest.push(arg.clone()),
        }
    }
    let want = match (a.batch, a.delete, a.update) {
        (false, false, false) => 2,
        (true, false, false) => 3,
        (false, true, false) if !a.create => 2,
        (false, false, true) if !a.create => 1,
        _ => return Err("-b, -D and -U do not combine (nor -c with -D or -U)".into()),
    };
    if a.rest.len() != want {
        return Err(format!("expected {want} arguments, got {}", a.rest.len()));
    }
    Ok(a)
}

/// Runs `tarta passwd ARGS`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("tarta passwd: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() { 0 } else { 2 };
        }
    };
    match run(&a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tarta passwd: {e}");
            1
        }
    }
}

fn run(a: &Args) -> Result<(), String> {
    let iterations = NonZeroU32::new(a.iterations.unwrap_or(DEFAULT_ITERATIONS))
        .ok_or("iterations must be at least 1")?;
    let file = PathBuf::from(&a.rest[0]);
    let mut lines = if a.create {
        Vec::new()
    } else {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e} (-c creates it)", file.display()))?;
        passwd::lines(&text).map_err(|e| format!("{}: {e}", file.display()))?
    };
    let hash = |pw: &str| Hash::new(pw.as_bytes(), iterations).map_err(|e| e.to_string());
    if a.update {
        for l in &mut lines {
            if let Line::Entry { field, .. } = l {
                if Hash::parse(field).is_err() {
                    *field = hash(field)?.to_string();
                }
            }
        }
    } else if a.delete {
        let user = &a.rest[1];
        let before = lines.len();
        lines.retain(|l| !matches!(l, Line::Entry { user: u, .. } if u == user));
        if lines.len() == before {
            return Err(format!("user {user} not in {}", file.display()));
        }
    } else {
        let user = &a.rest[1];
        if user.contains(':') || user.is_empty() {
            return Err("a username may not be empty or contain ':'".into());
        }
        let pw = if a.batch {
            a.rest[2].clone()
        } else {
            ask_twice()?
        };
        let field = hash(&pw)?.to_string();
        match lines
            .iter_mut()
            .find(|l| matches!(l, Line::Entry { user: u, .. } if u == user))
        {
            Some(Line::Entry { field: f, .. }) => *f = field,
            _ => lines.push(Line::Entry {
                user: user.clone(),
                field,
            }),
        }
    }
    write_atomically(&file, &passwd::render(&lines))
}

/// Writes `text` beside `file` and renames it over, keeping the old file's
/// permissions (a new file: owner read/write only).
fn write_atomically(file: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty());
    let name = file.file_name().ok_or("not a file name")?.to_string_lossy();
    let tmp = dir
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.tarta-passwd.tmp"));
    let mode = std::fs::metadata(file)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", file.display())
    })
}

/// Asks for the password twice, without echo when on a terminal.
fn ask_twice() -> Result<String, String> {
    let first = ask("Password: ")?;
    let second = ask("Reenter password: ")?;
    if first != second {
        return Err("passwords do not match".into());
    }
    if first.is_empty() {
        return Err("empty password".into());
    }
    Ok(first)
}

fn ask(prompt: &str) -> Result<String, String> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if tty {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
    }
    let _echo = tty.then(NoEcho::new).flatten();
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    if tty {
        eprintln!();
    }
    if n == 0 {
        return Err("no password given (end of input)".into());
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Turns terminal echo off on stdin until dropped.
struct NoEcho(libc::termios);

impl NoEcho {
    fn new() -> Option<NoEcho> {
        // SAFETY: termios is plain data; tcgetattr/tcsetattr on fd 0.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let old = t;
            t.c_lflag &= !libc::ECHO;
            t.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(NoEcho(old))
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_as_mosquitto_passwd_takes_them() {
        let a = parse(&args("-c -b f u p")).unwrap();
        assert!(a.create && a.batch && a.rest == ["f", "u", "p"]);
        let a = parse(&args("-H sha512-pbkdf2 -I 5000 f u")).unwrap();
        assert_eq!(a.iterations, Some(5000));
        assert!(parse(&args("-D f u")).unwrap().delete);
        assert!(parse(&args("-U f")).unwrap().update);
        assert!(parse(&args("-b f u")).is_err());
        assert!(parse(&args("-D -U f")).is_err());
        assert!(parse(&args("-c -D f u")).is_err());
        assert!(parse(&args("-H sha512 f u")).is_err());
        assert!(parse(&args("-I 0 f u")).is_err());
        assert!(parse(&args("-x f u")).is_err());
    }

    #[test]
    fn create_add_replace_delete_update() {
        let dir = std::env::temp_dir().join(format!("tarta-passwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        let f = f.to_str().unwrap();
        let run = |s: &str| main(&args(&s.replace("FILE", f)));
        assert_eq!(run("-c -b FILE alice one"), 0);
        assert_eq!(run("-b -I 7 FILE bob two"), 0);
        assert_eq!(run("-b FILE alice three"), 0);
        let check = |u: &str, p: &str| {
            let pf = passwd::PasswordFile::parse(&std::fs::read_to_string(f).unwrap()).unwrap();
            pf.check(u, p.as_bytes())
        };
        assert_eq!(check("alice", "three"), passwd::Verdict::Ok);
        assert_eq!(check("bob", "two"), passwd::Verdict::Ok);
        let text = std::fs::read_to_string(f).unwrap();
        assert!(text.starts_with("alice:$7$101$"), "{text}");
        assert!(text.contains("bob:$7$7$"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(run("-D FILE bob"), 0);
        assert_eq!(run("-D FILE bob"), 1);
        assert_eq!(check("bob", "two"), passwd::Verdict::UnknownUser);
        // -U hashes plaintext lines and keeps hashed ones.
        let hashed = std::fs::read_to_string(f).unwrap();
        std::fs::write(f, format!("# plant 7\n{hashed}carol:plain\n")).unwrap();
        assert_eq!(run("-U FILE"), 0);
        assert_eq!(check("carol", "plain"), passwd::Verdict::Ok);
        assert_eq!(check("alice", "three"), passwd::Verdict::Ok);
        assert!(std::fs::read_to_string(f)
            .unwrap()
            .starts_with(&format!("# plant 7\n{hashed}")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
