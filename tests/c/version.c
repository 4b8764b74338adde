/* Version and status-name queries: the library matches the header it is used with. */
#include "common.h"

#define STR2(x) #x
#define STR(x) STR2(x)

static int test_main(int argc, char **argv) {
    const char *fixtures, *work;
    parse_args(argc, argv, &fixtures, &work);

    const char *v = hdb_version_string();
    CHECK(v != NULL, "hdb_version_string() is not NULL");
    CHECK(strcmp(v, HDB_VERSION_STRING) == 0, "hdb_version_string() '%s' == HDB_VERSION_STRING '%s'",
          v, HDB_VERSION_STRING);
    CHECK(hdb_version_string() == v, "hdb_version_string() is static (same pointer twice)");

    unsigned major = 0, minor = 0, patch = 0;
    char rest = 0;
    int n = sscanf(v, "%u.%u.%u%c", &major, &minor, &patch, &rest);
    CHECK(n == 3, "'%s' parses as exactly MAJOR.MINOR.PATCH (sscanf matched %d)", v, n);
    CHECK(major == HDB_VERSION_MAJOR && minor == HDB_VERSION_MINOR && patch == HDB_VERSION_PATCH,
          "'%s' == HDB_VERSION_MAJOR.MINOR.PATCH %d.%d.%d", v, HDB_VERSION_MAJOR, HDB_VERSION_MINOR,
          HDB_VERSION_PATCH);
    CHECK(strcmp(HDB_VERSION_STRING,
                 STR(HDB_VERSION_MAJOR) "." STR(HDB_VERSION_MINOR) "." STR(HDB_VERSION_PATCH)) == 0,
          "the header's HDB_VERSION_STRING agrees with its HDB_VERSION_MAJOR/MINOR/PATCH");

    CHECK(hdb_abi_version() == HDB_ABI_VERSION, "hdb_abi_version() %u == HDB_ABI_VERSION %u",
          hdb_abi_version(), (unsigned)HDB_ABI_VERSION);

    CHECK(strcmp(hdb_status_name(HDB_STATUS_OK), "HDB_STATUS_OK") == 0,
          "hdb_status_name(HDB_STATUS_OK) == \"HDB_STATUS_OK\"");
    CHECK(strcmp(hdb_status_name(HDB_STATUS_NULL_ARGUMENT), "HDB_STATUS_NULL_ARGUMENT") == 0,
          "hdb_status_name(HDB_STATUS_NULL_ARGUMENT) == \"HDB_STATUS_NULL_ARGUMENT\"");
    CHECK(strcmp(hdb_status_name(HDB_STATUS_DIVERGED), "HDB_STATUS_DIVERGED") == 0,
          "hdb_status_name(HDB_STATUS_DIVERGED) (the last code) == \"HDB_STATUS_DIVERGED\"");
    CHECK(strcmp(hdb_status_name(HDB_STATUS_DIVERGED + 1), "HDB_STATUS_UNKNOWN") == 0,
          "hdb_status_name(HDB_STATUS_DIVERGED + 1) == \"HDB_STATUS_UNKNOWN\"");
    CHECK(strcmp(hdb_status_name(9999), "HDB_STATUS_UNKNOWN") == 0,
          "hdb_status_name(9999) == \"HDB_STATUS_UNKNOWN\"");
    CHECK(strcmp(hdb_status_name(UINT32_MAX), "HDB_STATUS_UNKNOWN") == 0,
          "hdb_status_name(UINT32_MAX) == \"HDB_STATUS_UNKNOWN\"");

    /* Every known code has a distinct name starting with HDB_STATUS_. */
    bool names_ok = true;
    for (uint32_t s = 0; s <= HDB_STATUS_DIVERGED; s++) {
        const char *a = hdb_status_name(s);
        if (strncmp(a, "HDB_STATUS_", 11) != 0 || strcmp(a, "HDB_STATUS_UNKNOWN") == 0) {
            names_ok = false;
            printf("  status %u has name '%s'\n", s, a);
        }
        for (uint32_t t = 0; t < s; t++) {
            if (strcmp(a, hdb_status_name(t)) == 0) {
                names_ok = false;
                printf("  status %u and %u share the name '%s'\n", t, s, a);
            }
        }
    }
    CHECK(names_ok, "statuses 0..=HDB_STATUS_DIVERGED have distinct HDB_STATUS_* names");

    CHECK(hdb_last_error_message() != NULL && hdb_last_error_message()[0] == '\0',
          "hdb_last_error_message() is \"\" before any failing call");

    return test_done("version");
}
