/**
 * JobEventBus against real Redis: a reservation (SUBSCRIBE started early, while the gateway still reads the cache and
 * the queue depth) is taken over by `subscribe` with nothing lost and nothing reordered, and a dropped reservation
 * leaves no subscription behind.
 */
import Redis from 'ioredis';
import { silentLogger } from '../src/logger';
import { jobChannel } from '../src/protocol/job';
import { JobEventBus } from '../src/queue/job-events';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
let pub: Redis;
let bus: JobEventBus;

beforeAll(() => {
  pub = redis.connect();
  bus = new JobEventBus(redis.connect(), silentLogger);
});

const subscribers = async (jobId: string) =>
  Number(((await pub.call('PUBSUB', 'NUMSUB', jobChannel(jobId))) as [string, number])[1]);

it('subscribe takes over a reservation: messages that came before are delivered first, in order, then live ones', async () => {
  bus.reserve('job-a');
  await new Promise((r) => setTimeout(r, 50)); // the SUBSCRIBE is acknowledged by now
  await pub.publish(jobChannel('job-a'), 'one');
  await pub.publish(jobChannel('job-a'), 'two');
  await new Promise((r) => setTimeout(r, 50));
  const got: string[] = [];
  const unsubscribe = await bus.subscribe('job-a', (m) => got.push(m));
  expect(got).toEqual(['one', 'two']);
  await pub.publish(jobChannel('job-a'), 'three');
  await new Promise((r) => setTimeout(r, 50));
  expect(got).toEqual(['one', 'two', 'three']);
  await unsubscribe();
  expect(await subscribers('job-a')).toBe(0);
  expect(bus.size).toBe(0);
});

it('subscribe right after reserve waits for the acknowledgement (subscribe-before-enqueue still holds)', async () => {
  bus.reserve('job-b');
  const got: string[] = [];
  const unsubscribe = await bus.subscribe('job-b', (m) => got.push(m));
  expect(await subscribers('job-b')).toBe(1); // Redis has the subscription when subscribe() resolves
  await pub.publish(jobChannel('job-b'), 'started');
  await new Promise((r) => setTimeout(r, 50));
  expect(got).toEqual(['started']);
  await unsubscribe();
});

it('release drops a reservation that no run took, and a second subscribe of a taken channel is refused', async () => {
  bus.reserve('job-c');
  await new Promise((r) => setTimeout(r, 50));
  expect(await subscribers('job-c')).toBe(1);
  bus.release('job-c');
  await new Promise((r) => setTimeout(r, 50));
  expect(await subscribers('job-c')).toBe(0);
  expect(bus.size).toBe(0);

  const unsubscribe = await bus.subscribe('job-d', () => undefined);
  bus.release('job-d'); // not a reservation any more: no effect
  await expect(bus.subscribe('job-d', () => undefined)).rejects.toThrow(/already subscribed/);
  expect(await subscribers('job-d')).toBe(1);
  await unsubscribe();
});
