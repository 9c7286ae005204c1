"""The memory plan: what each stage of a run needs on the device, counted at real size on the
meta device (``count``), the stages of each job with what is resident in each (``stages``), the
fastest settings that fit the GPU (``auto``) and the table / plan.json the user reads (``report``)."""
