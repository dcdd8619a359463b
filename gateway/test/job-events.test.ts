/**
 * JobEventBus against real Redis: a reservation (SUBSCRIBE started early, while the gateway still reads the cache and
 * the queue depth) is taken over by `subscribe` with nothing lost and nothing reordered, a dropped reservation
 * leaves no subscription behind, and two followers of one job share its channel.
 */
import Redis from 'ioredis';
import { silentLogger } from '../src/logger';
import { jobChannel } from '../src/protocol/job';
import { JobEventBus } from '../src/queue/job-events';
import { waitFor } from './helpers/gateway';
import { useTestRedis } from './helpers/redis-server';

const redis = useTestRedis();
let pub: Redis;
let sub: Redis;
let bus: JobEventBus;

beforeAll(() => {
  pub = redis.connect();
  sub = redis.connect();
  bus = new JobEventBus(sub, silentLogger);
});

const subscribers = async (jobId: string) =>
  Number(((await pub.call('PUBSUB', 'NUMSUB', jobChannel(jobId))) as [string, number])[1]);
const subscribed = (jobId: string, n: number) => waitFor(async () => (await subscribers(jobId)) === n, undefined, `${n} subscriber(s) of ${jobId}`);
/**
 * Redis pushes a PUBLISH to its subscribers before it answers the publisher, and answers a connection's commands in
 * order: once a PING on the bus's own connection is answered, every message published before has reached the bus.
 */
const delivered = () => sub.ping();

it('subscribe takes over a reservation: messages that came before are delivered first, in order, then live ones', async () => {
  bus.reserve('job-a');
  await subscribed('job-a', 1);
  await pub.publish(jobChannel('job-a'), 'one');
  await pub.publish(jobChannel('job-a'), 'two');
  await delivered(); // both are buffered in the reservation now, before `subscribe` takes it over
  const got: string[] = [];
  const unsubscribe = await bus.subscribe('job-a', (m) => got.push(m));
  expect(got).toEqual(['one', 'two']);
  await pub.publish(jobChannel('job-a'), 'three');
  await delivered();
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
  await delivered();
  expect(got).toEqual(['started']);
  await unsubscribe();
});

it('release drops a reservation that no run took, but not a channel a run has taken', async () => {
  bus.reserve('job-c');
  await subscribed('job-c', 1);
  bus.release('job-c');
  expect(bus.size).toBe(0);
  await subscribed('job-c', 0); // the UNSUBSCRIBE follows the SUBSCRIBE's acknowledgement; a leak times out here

  const unsubscribe = await bus.subscribe('job-d', () => undefined);
  bus.release('job-d'); // not a reservation any more: no effect
  expect(await subscribers('job-d')).toBe(1);
  await unsubscribe();
});

it('a second follower of a job (a resumed stream beside the run) shares its channel: both hear every message', async () => {
  const run: string[] = [];
  const resumed: string[] = [];
  const leaveRun = await bus.subscribe('job-e', (m) => run.push(m));
  await pub.publish(jobChannel('job-e'), 'one');
  await delivered();
  const leaveResumed = await bus.subscribe('job-e', (m) => resumed.push(m));
  await pub.publish(jobChannel('job-e'), 'two');
  await delivered();
  expect({ run, resumed }).toEqual({ run: ['one', 'two'], resumed: ['two'] }); // from its subscribe on
  expect(await subscribers('job-e')).toBe(1); // one SUBSCRIBE for both
  await leaveRun();
  await pub.publish(jobChannel('job-e'), 'three');
  await delivered();
  expect(resumed).toEqual(['two', 'three']); // the channel stays while a follower is left
  await leaveResumed();
  expect(await subscribers('job-e')).toBe(0);
  expect(bus.size).toBe(0);
});
