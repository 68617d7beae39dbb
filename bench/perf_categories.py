#!/usr/bin/env python3
"""Groups `perf script -F ip,sym,dso` output (call graphs) into cost categories.

Usage: perf script -i perf.data -F ip,sym,dso | bench/perf_categories.py [TRANSACTIONS CPU_SECONDS]
With TRANSACTIONS and the process's CPU seconds over the recording, also prints us/txn per category.
"""
import collections, re, sys

def samples(lines):
    stack = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if stack:
                yield stack
            stack = []
            continue
        m = re.match(r"\s*[0-9a-f]+ (.*) \((.*)\)$", line)
        if m:
            stack.append((m.group(1), m.group(2)))
    if stack:
        yield stack

ALLOC = re.compile(r"^(malloc|free|realloc|calloc|cfree|_int_malloc|_int_free\w*|_int_realloc|malloc_consolidate|tcache\w*|__libc_malloc|__libc_free|__libc_realloc|unlink_chunk\w*|alloc::alloc::\w+|__rust_alloc|__rust_dealloc|__rust_realloc|<alloc::raw_vec\w*)")

def kernel_category(stack):
    for sym, dso in stack:
        if "kernel" in dso:
            continue
        s = sym
        if re.search(r"send", s): return "kernel: sendto (TCP send + loopback delivery)"
        if re.search(r"recv", s): return "kernel: recvfrom"
        if "epoll_wait" in s: return "kernel: epoll_wait (incl. sleeping/wakeup)"
        if s == "syscall" or "futex" in s: return "kernel: futex (worker thread wake/park)"
        if "sched_yield" in s: return "kernel: sched_yield"
        return "kernel: other syscall (%s)" % s
    return "kernel: no user frame (irq/softirq/switch)"

def user_category(stack):
    leaf = stack[0][0]
    syms = [s for s, _ in stack]
    if any("pgrelay::routing::" in s for s in syms[:12]):
        return "user: statement classification (routing::)"
    if ALLOC.match(leaf) or any(ALLOC.match(s) for s in syms[:3]) and not leaf.startswith("pgrelay"):
        return "user: malloc/free"
    if leaf.startswith(("memcpy", "__memcpy", "__memmove", "memmove", "__memset", "memset", "__memcmp", "memcmp", "__memchr", "bcmp", "__strlen")):
        return "user: memcpy/memcmp/memchr"
    if "tracing" in leaf:
        return "user: tracing spans"
    if leaf.startswith(("tokio::", "mio::", "<tokio", "<mio", "parking_lot", "std::sync", "tokio_util", "<tokio_util", "<core::future::poll_fn")):
        return "user: tokio runtime / io driver / wakers"
    if leaf.startswith(("epoll_wait", "__send", "__libc_recv", "__libc_send", "recv", "send", "syscall", "__GI___")):
        return "user: libc syscall wrappers"
    if "bytes::" in leaf:
        return "user: bytes (BytesMut split/freeze/drop)"
    if leaf.startswith("pgrelay::session") or "pgrelay::session" in leaf:
        return "user: session state machine"
    if "pgrelay::protocol" in leaf:
        return "user: protocol parsing"
    if "clock_gettime" in leaf:
        return "user: clock_gettime (tokio timers/coop)"
    if "CancellationToken" in leaf or "cancel" in leaf.lower():
        return "user: cancellation token"
    return "user: other (%s)" % leaf[:80]

def nearest_pgrelay(stack):
    for sym, dso in stack:
        if sym.startswith("pgrelay::") or sym.startswith("<pgrelay::"):
            return sym[:110]
    return "(no pgrelay frame)"

def main():
    cats = collections.Counter()
    alloc_from = collections.Counter()
    user_leaf = collections.Counter()
    total = 0
    for st in samples(sys.stdin):
        total += 1
        if "kernel" in st[0][1]:
            cats[kernel_category(st)] += 1
        else:
            c = user_category(st)
            cats[c] += 1
            user_leaf[st[0][0][:110]] += 1
            if c == "user: malloc/free":
                alloc_from[nearest_pgrelay(st)] += 1
    txns = float(sys.argv[1]) if len(sys.argv) > 2 else None
    cpu = float(sys.argv[2]) if len(sys.argv) > 2 else None
    print(f"samples: {total}")
    for c, n in cats.most_common():
        extra = f"  {cpu * 1e6 * n / total / txns:6.2f} us/txn" if txns else ""
        print(f"{100.0 * n / total:6.2f}%  {c}{extra}")
    print("\nmalloc/free by nearest pgrelay caller:")
    for c, n in alloc_from.most_common(15):
        print(f"{100.0 * n / total:6.2f}%  {c}")
    print("\ntop user-space leaf symbols:")
    for c, n in user_leaf.most_common(30):
        print(f"{100.0 * n / total:6.2f}%  {c}")

main()
