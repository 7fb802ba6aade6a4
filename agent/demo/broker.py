"""The embedded MQTT broker: amqtt in a process of its own (``python -m agent.demo.broker --port N``).

amqtt 0.12 speaks MQTT 3.1.1 only and carried about 2,000 QoS 1 messages/s here: enough for the demo, not for
production (use Mosquitto or any broker with ``edge-agent demo --broker HOST:PORT``). It runs as a separate
process so its event loop competes with neither the live view nor the devices for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from amqtt.broker import Broker

# Device payloads go up to ~640 kB (20 s of audio); amqtt's default read limit is far above that, and the agent
# dead-letters anything over its own limit (1 MiB) anyway.
PLUGINS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = {"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 64}},
              "plugins": PLUGINS}
    broker = Broker(config)
    await broker.start()
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.demo.broker", description="amqtt for the demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # amqtt logs every connection at INFO and a traceback when a client drops without DISCONNECT (which paho
    # does on a clean loop_stop): warnings and errors are what an operator needs in the demo's log.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
