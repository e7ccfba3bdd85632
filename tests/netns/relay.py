"""A TCP relay that delays every byte by a fixed one-way delay in each direction,
preserving order: the harness's stand-in for a long-haul link (the kernel here has no
netem). Usage: relay.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT DELAY_MS"""

import asyncio
import sys


async def pump(reader, writer, delay):
    queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            queue.put_nowait((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((0, None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def handle(reader, writer, host, port, delay):
    try:
        up_reader, up_writer = await asyncio.open_connection(host, port)
    except OSError:
        writer.close()
        return
    await asyncio.gather(pump(reader, up_writer, delay), pump(up_reader, writer, delay))


async def main():
    listen, host, port, delay_ms = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, host, port, delay_ms / 1000.0), "127.0.0.1", listen
    )
    async with server:
        await server.serve_forever()


asyncio.run(main())
