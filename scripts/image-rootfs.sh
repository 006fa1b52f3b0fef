#!/usr/bin/env bash
# Assembles the runtime filesystem of the serving image in DEST: the server
# binary (stripped), exactly the shared libraries it links (and their loader),
# a passwd/group naming uid/gid 65532, and an empty /tmp. No shell, no
# package manager: what the binary needs and nothing else.
#
#   scripts/image-rootfs.sh BINARY DEST
set -euo pipefail
binary=$1 dest=$2

mkdir -p "$dest/usr/local/bin" "$dest/etc" "$dest/tmp" "$dest/models"
install -m 0755 "$binary" "$dest/usr/local/bin/candlewick-serve"
strip --strip-unneeded "$dest/usr/local/bin/candlewick-serve" 2>/dev/null || true

# Every library the dynamic loader resolves, at the path it resolves it to,
# plus the loader itself (`ldd` prints it without `=>`).
ldd "$binary" | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+ \(/ { print $1 }' | sort -u |
  while read -r lib; do
    mkdir -p "$dest$(dirname "$lib")"
    cp -L "$lib" "$dest$lib"
  done

printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >"$dest/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$dest/etc/group"
chmod 1777 "$dest/tmp"
