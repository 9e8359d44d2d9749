"""Ray outside one run: how a driver gets Ray (``connect``), a private instance that dies with its
driver (``private``, ``watchdog``, ``procs``), scaling profiles (``profile``), `difflm cluster`'s node
start/stop (``nodes``) and status (``status``), and recovery after a lost node (``recovery``)."""
