"""Copy a minimal root file system out of a debootstrap root: the image's base.

    chroot ROOT python3 - DEST PACKAGE... < scripts/slim-base.py

Run inside the full root by its own interpreter (scripts/build-image.sh does), it copies
the named packages and every package owning a shared library that one of their ELF files
loads (asked of the dynamic loader itself, so the set follows what really links), into
DEST. Packages come whole, minus documentation, translations and iconv modules; nothing
else comes (no apt, dpkg, perl or coreutils: the image installs nothing at run time and
its builder stage runs only python and /bin/sh). DEST's /var/lib/dpkg/status lists exactly
the copied packages, so an image scanner sees what is there. Standard library only.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# What no program here reads at run time: documentation and translations, and glibc's
# iconv converters (gconv, 8 MB: Python decodes with its own codecs, nothing calls iconv).
LEFT_OUT = re.compile(
    r"^/usr/share/(doc|doc-base|man|info|locale|lintian|bug|gtk-doc)(/|$)|^/usr/lib/[^/]+/gconv(/|$)"
)
# Files that belong to no package but the root needs: the user database (useradd adds
# to it), name service order, the CA bundle update-ca-certificates generated, and the
# loader's configuration (its cache is regenerated for DEST).
GENERATED = (
    "/etc/passwd",
    "/etc/group",
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/nsswitch.conf",
    "/etc/ld.so.conf",
    "/etc/ssl/certs",
)
DPKG = Path("/var/lib/dpkg")
# The dynamic loader, at its ABI's path: /lib64/ld-linux-x86-64.so.2, /lib/ld-linux-aarch64.so.1...
LOADER = min(glob.glob("/lib*/ld-linux*.so.[0-9]"), default="/lib64/ld-linux-x86-64.so.2")
LIBRARY = re.compile(r"=>\s+(\S+)\s+\(")


def package_files() -> dict[str, list[str]]:
    """Each installed package's listed paths, from dpkg's own lists (`name[:arch]`)."""
    files: dict[str, list[str]] = {}
    for listing in sorted((DPKG / "info").glob("*.list")):
        name = listing.stem.partition(":")[0]
        files[name] = listing.read_text("utf-8").splitlines()
    return files


def owners(files: dict[str, list[str]]) -> dict[str, str]:
    """Each listed regular file's package, by its real path (merged /usr makes /lib and
    /usr/lib one). Symlinks are not ownership: a -dev package's libz.so points into zlib1g.
    """
    found: dict[str, str] = {}
    for package, paths in files.items():
        for path in paths:
            if os.path.isfile(path) and not os.path.islink(path):
                found[os.path.realpath(path)] = package
    return found


def is_elf(path: str) -> bool:
    """A regular file starting with the ELF magic."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == b"\x7fELF"


def libraries(path: str) -> list[str]:
    """The shared libraries the loader resolves for `path`; an unresolved one stops us."""
    listed = subprocess.run([LOADER, "--list", path], capture_output=True, text=True, check=False)
    if "not found" in listed.stdout:
        sys.exit(f"slim-base: {path} needs a library that is not installed:\n{listed.stdout}")
    return [os.path.realpath(m.group(1)) for m in LIBRARY.finditer(listed.stdout)]


def closure(wanted: list[str], files: dict[str, list[str]]) -> set[str]:
    """The wanted packages and, transitively, the owners of the libraries their ELF files load."""
    owner = owners(files)
    keep: set[str] = set()
    pending = list(wanted)
    while pending:
        package = pending.pop()
        if package in keep:
            continue
        if package not in files:
            sys.exit(f"slim-base: package {package} is not installed")
        keep.add(package)
        for path in files[package]:
            if is_elf(path):
                pending.extend(owner[lib] for lib in libraries(path) if lib in owner)
    return keep


def copy(path: str, dest: Path) -> None:
    """One path into DEST as it is (symlink, directory or file), with owner, mode and times.

    It lands under its parent's real path (merged /usr: /lib64/x is /usr/lib64/x), whose
    directories are copied first.
    """
    parent = os.path.realpath(os.path.dirname(path))
    if parent != "/":
        copy(parent, dest)
    target = Path(str(dest) + parent.rstrip("/") + "/" + os.path.basename(path))
    if os.path.lexists(target) or not os.path.lexists(path):
        return
    info = os.lstat(path)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
        target.mkdir()
        shutil.copystat(path, target)
    elif os.path.isfile(path):
        shutil.copy2(path, target)
    else:
        return
    os.chown(target, info.st_uid, info.st_gid, follow_symlinks=False)


def copy_tree(path: str, dest: Path) -> None:
    """A file, or a directory and everything under it."""
    copy(path, dest)
    for parent, dirs, names in os.walk(path):
        for name in sorted(dirs + names):
            copy(os.path.join(parent, name), dest)


def byte_code(path: str) -> str | None:
    """The compiled file Debian's py3compile made for a packaged .py, where there is one."""
    if not path.endswith(".py"):
        return None
    source = Path(path)
    tag = sys.implementation.cache_tag
    compiled = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
    return str(compiled) if compiled.is_file() else None


def status(keep: set[str]) -> str:
    """dpkg's status file reduced to the kept packages' paragraphs."""
    kept = []
    for paragraph in (DPKG / "status").read_text("utf-8").split("\n\n"):
        match = re.search(r"^Package: (\S+)$", paragraph, re.MULTILINE)
        if match and match.group(1) in keep:
            kept.append(paragraph.strip("\n"))
    return "\n\n".join(kept) + "\n"


def main() -> None:
    dest = Path(sys.argv[1])
    wanted = sys.argv[2:]
    files = package_files()
    keep = closure(wanted, files)
    dest.mkdir()
    # The root's own top level first: merged /usr's symlinks (/bin -> usr/bin) and the
    # mount points (/proc, /tmp...), so that every later path lands where it does here.
    for name in sorted(os.listdir("/")):
        if "/" + name != str(dest):
            copy("/" + name, dest)
    for package in sorted(keep):
        for path in files[package]:
            if LEFT_OUT.match(path):
                continue
            copy(path, dest)
            compiled = byte_code(path)
            if compiled:
                copy(compiled, dest)
    for path in GENERATED:
        copy_tree(path, dest)
    info = DPKG / "info"
    copy(str(info), dest)
    for listing in sorted(info.iterdir()):
        package = listing.stem.partition(":")[0]
        if package in keep and listing.suffix in (".list", ".md5sums", ".conffiles"):
            copy(str(listing), dest)
    (Path(str(dest) + str(DPKG)) / "status").write_text(status(keep), "utf-8")
    subprocess.run(["ldconfig", "-r", str(dest)], check=True)
    print(" ".join(sorted(keep)))


if __name__ == "__main__":
    main()
