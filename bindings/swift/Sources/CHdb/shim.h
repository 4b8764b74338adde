/* The C API for Swift's CHdb module; the include path comes from pkg-config (hdb.pc). */
#include <hdb.h>
