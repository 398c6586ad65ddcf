"""Tools that use the library and are not part of it: the ``mmsink`` command line (``cli``), ``bench``,
``convert_llava``, ``inspector`` / ``calibrate`` / ``diagnose``, ``reads`` (device-read counter) and the
shared model loader (``loading``)."""
