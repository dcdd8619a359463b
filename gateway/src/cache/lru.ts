/** A small LRU bounded by entry count, total bytes and a per-entry TTL (a Map keeps insertion order: oldest first). */
export class Lru<V> {
  private readonly map = new Map<string, { value: V; bytes: number; expires: number }>();
  private bytes = 0;

  constructor(
    private readonly maxEntries: number,
    private readonly maxBytes: number,
  ) {}

  get size(): number {
    return this.map.size;
  }

  get totalBytes(): number {
    return this.bytes;
  }

  get(key: string, now = Date.now()): V | undefined {
    const e = this.map.get(key);
    if (!e) return undefined;
    this.map.delete(key);
    if (e.expires <= now) {
      this.bytes -= e.bytes;
      return undefined;
    }
    this.map.set(key, e); // most recently used goes last
    return e.value;
  }

  set(key: string, value: V, bytes: number, ttlMs: number, now = Date.now()): void {
    this.delete(key);
    if (this.maxEntries <= 0 || bytes > this.maxBytes) return;
    while (this.map.size >= this.maxEntries || this.bytes + bytes > this.maxBytes) {
      const oldest = this.map.keys().next();
      if (oldest.done) break;
      this.delete(oldest.value);
    }
    this.map.set(key, { value, bytes, expires: now + ttlMs });
    this.bytes += bytes;
  }

  delete(key: string): void {
    const e = this.map.get(key);
    if (!e) return;
    this.map.delete(key);
    this.bytes -= e.bytes;
  }
}
