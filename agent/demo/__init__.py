"""``edge-agent demo``: the whole product on one machine, as an operator would run it.

An embedded MQTT broker (or the one given), the reference devcloud, simulated devices replaying CityPulse rows
and synthetic audio, an uplink whose capacity follows a real trace, and the agent itself as a subprocess, with a
live view scraped from the agent's ``/metrics`` and its result topics. The demo is a *user* of the agent: nothing
in the agent imports this package (or rich, or amqtt).
"""
