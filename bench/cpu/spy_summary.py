"""Summarise a py-spy raw (collapsed) profile: self and inclusive shares of the top frames (transport_rate.py --profile)."""
import collections
import sys

self_c, incl, tot = collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    tot += n
    frames = stack.split(";")
    self_c[frames[-1]] += n
    for f in set(frames):
        incl[f] += n
print("samples", tot)
print("--- self")
for f, n in self_c.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 20):
    print(f"{100 * n / tot:5.1f}% {f}")
print("--- inclusive")
for f, n in incl.most_common(60):
    print(f"{100 * n / tot:5.1f}% {f}")
