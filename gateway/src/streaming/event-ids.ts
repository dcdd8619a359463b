/**
 * The `id:` of every event of a /v1 stream, so that a client whose connection dropped can resume it
 * (GET /v1/chat/completions/{id}/stream, README "Resumable streams") and get exactly the events it has not seen.
 *
 * An id names where its event sits in the rendering of the job's events: `<completion id>/<seq>.<k>` is the k-th
 * SSE event (from 0) rendered while handling the worker event numbered `seq` (docs/PROTOCOL.md); seq 0 is before any
 * worker event (a completion's echoed prompt). The role chunk goes with the delta that opens its choice; the finish
 * chunks, the usage chunk and `[DONE]` with the `done` event. Rendering is a pure function of the job's events (no
 * random ids, no clock), so a resume renders them again from the stored events, from seq 1, and sends only the events
 * whose position comes after the client's Last-Event-ID.
 *
 * A stream of several jobs (a /v1/completions list of prompts, one job each) carries one `<seq>.<k>` per job,
 * comma-separated, `-` for a job of which nothing was sent yet: the last event sent of each job. The events that end
 * the whole stream (finish chunks, usage, [DONE]) go with the last job's `done`. An error written into the stream has
 * no id (neither has the [DONE] after it): a client that resumes after one continues from its last real event.
 */
import { ApiError } from '../errors';

export interface Position {
  seq: number;
  k: number;
}

const before = (a: Position, b: Position) => a.seq < b.seq || (a.seq === b.seq && a.k <= b.k);

export class EventCursor {
  private part = 0;
  /** Per job: the position the next event gets. */
  private readonly next: Position[];
  /** Per job: the last event sent (null: none yet). */
  private readonly last: Array<Position | null>;

  /** `seen`: the client's Last-Event-ID, parsed (parseLastEventId); events up to it are not sent again. */
  constructor(
    readonly completionId: string,
    parts: number,
    private readonly seen: ReadonlyArray<Position | null> | null = null,
  ) {
    this.next = Array.from({ length: parts }, () => ({ seq: 0, k: 0 }));
    this.last = seen ? [...seen] : Array.from({ length: parts }, () => null);
  }

  /** The events rendered from now on come from worker event `seq` of job `part`. */
  at(part: number, seq: number): void {
    this.part = part;
    const n = this.next[part];
    if (n.seq !== seq) {
      n.seq = seq;
      n.k = 0;
    }
  }

  /** Takes the next position: its id, or null when the client already has that event (a resume skips it). */
  take(): string | null {
    const n = this.next[this.part];
    const pos = { seq: n.seq, k: n.k };
    n.k += 1;
    const seen = this.seen?.[this.part];
    if (seen && before(pos, seen)) return null;
    this.last[this.part] = pos;
    return `${this.completionId}/${this.last.map((p) => (p ? `${p.seq}.${p.k}` : '-')).join(',')}`;
  }
}

/**
 * A Last-Event-ID header as positions per job; absent or empty: null (the stream from its start). One that does not
 * belong to this stream is a 400 naming the header.
 */
export function parseLastEventId(header: string | undefined, completionId: string, parts: number): Array<Position | null> | null {
  if (header === undefined || header.trim() === '') return null;
  const value = header.trim();
  const prefix = `${completionId}/`;
  const fields = value.startsWith(prefix) ? value.slice(prefix.length).split(',') : [];
  const out = fields.map((f): Position | null | undefined => {
    if (f === '-') return null;
    const m = /^(\d{1,9})\.(\d{1,9})$/.exec(f);
    return m ? { seq: Number(m[1]), k: Number(m[2]) } : undefined;
  });
  if (out.length !== parts || out.some((p) => p === undefined)) {
    throw new ApiError('invalid_value', `Invalid 'Last-Event-ID': expected an id of this stream's events (${prefix}<seq>.<k>), got '${value.slice(0, 200)}'.`, {
      param: 'Last-Event-ID',
    });
  }
  return out as Array<Position | null>;
}
