"""GPU utilisation and memory per device for `/metrics`, read through NVML at scrape time.

NVML comes from pynvml (the optional extra `gpu`: `pip install 'cirrus-serve[gpu]'`, which installs
nvidia-ml-py). Without it, without a driver, or when NVML fails to start, the collector yields
nothing and says why once in the log: a machine with no GPU has no GPU metrics, and no error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("cirrus.gpu_metrics")


class GpuCollector:
    """A prometheus_client collector (`collect()`); NVML is imported and started at the first scrape."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False

    def collect(self) -> Iterator[Metric]:
        nvml = self._start()
        if nvml is None:
            return
        utilization = GaugeMetricFamily(
            "cirrus_gpu_utilization_ratio", "Time a kernel ran on the GPU over the last sample period", labels=["gpu"]
        )
        used = GaugeMetricFamily("cirrus_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("cirrus_gpu_memory_total_bytes", "GPU memory installed", labels=["gpu"])
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception:
            log.warning("NVML: counting the GPUs failed", exc_info=True)
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # a device that fell off the bus, or one NVML cannot query: left out
                log.debug("NVML: reading GPU %d failed", index, exc_info=True)
                continue
            utilization.add_metric([str(index)], float(rates.gpu) / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        yield from (utilization, used, total)

    def _start(self) -> Any:
        """pynvml, initialised; None when it is missing or NVML does not start (tried once)."""
        if self._tried:
            return self._nvml
        self._tried = True
        try:
            import pynvml  # optional: the `gpu` extra
        except ImportError:
            log.info("no GPU metrics: pynvml is not installed (pip install 'cirrus-serve[gpu]')")
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # no driver, no library: NVML raises its own error types
            log.info("no GPU metrics: NVML did not start (%s)", exc)
            return None
        self._nvml = pynvml
        return pynvml
