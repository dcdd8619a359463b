// Issue 14 target 4: does corking an SSE response for one event-loop turn save socket writes? Counts the socket's
// _write/_writev calls (each one syscall) for N events written in one turn, plain and with
// res.cork() … process.nextTick(res.uncork). Node's http auto-corks the socket on every res.write until the next tick
// already, so the plain case is expected to be one socket write too.
//
//   node bench/cpu/sse_write_probe.mjs [events=3]
import http from 'node:http';
import net from 'node:net';

const EVENTS = Number(process.argv[2] ?? 3);

function probe(cork) {
  return new Promise((resolve) => {
    const counts = { socketWrites: 0, inTurn: 0 };
    const server = http.createServer((req, res) => {
      const sock = res.socket;
      for (const name of ['_write', '_writev']) {
        const orig = sock[name].bind(sock);
        sock[name] = (...args) => ((counts.socketWrites += 1), orig(...args));
      }
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.flushHeaders();
      setTimeout(() => {
        counts.socketWrites = 0; // the headers' write is not counted
        if (cork) res.cork();
        for (let i = 0; i < EVENTS; i++) res.write(`data: {"i":${i}}\n\n`);
        if (cork) process.nextTick(() => res.uncork());
        setTimeout(() => ((counts.inTurn = counts.socketWrites), res.end()), 50);
      }, 50);
    });
    server.listen(0, '127.0.0.1', () => {
      const c = net.connect(server.address().port, '127.0.0.1', () => c.write('GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'));
      c.on('data', () => undefined);
      c.on('end', () => {
        server.close();
        resolve(counts);
      });
    });
  });
}

const plain = await probe(false);
const corked = await probe(true);
console.log(`node ${process.version}, ${EVENTS} SSE events written in one turn`);
console.log(`plain res.write:        ${plain.inTurn} socket write(s)`);
console.log(`res.cork() .. nextTick: ${corked.inTurn} socket write(s)`);
